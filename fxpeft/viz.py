"""See the surgery: draw an fxpeft graph with Graphviz.

:func:`draw` renders a ``torch.fx.GraphModule`` to ``.svg``, ``.png``, ``.pdf`` or ``.dot``:

* nodes are grouped into nested **module clusters** (``nn_module_stack`` for export graphs, the qualified
  target for symbolic_trace graphs), each labelled with its path and class;
* clusters deeper than ``depth`` are **collapsed** into one box, which still shows the adapters it holds
  (``LoRA ×7``); runs of identical blocks (``layers.0`` … ``layers.15``) are **drawn once**, marked ``×16``;
* **adapter nodes** have one colour per method (a legend says which), inside the cluster of the site they
  adapt, whose border takes the method's colour too;
* **edges** carry the shape (and the dtype, where it differs from the graph's usual one) of the value;
* with ``before=`` (a snapshot taken before a pass) it draws a **diff**: added nodes green, removed nodes
  red and dashed, so a merge shows the adapters folded away.

Shape plumbing (views, transposes, ``sym_size``, asserts) and parameter reads are left out by default
(``compact=True``); the parameter shapes a site or adapter reads are written on its node instead.

The drawing is computed on :func:`fxpeft.to_networkx`'s view of the graph.
"""

from __future__ import annotations

import html
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
from torch import fx

from .errors import DrawError, FxPeftError, GraphvizNotFoundError
from .graph import to_networkx
from .registry import PeftRegistry

__all__ = ["draw", "to_dot", "GraphvizPackageNotFoundError"]

_SPARE_COLORS = [("#d0bfff", "#6741d9"), ("#a5d8ff", "#1971c2"), ("#fcc2d7", "#c2255c"), ("#ffec99", "#e67700")]
_ADDED, _REMOVED = "#2f9e44", "#e03131"
_FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": None, ".gv": None}

# Ops that only move or re-view data. Drawn, they outnumber the maths several times over; compact mode
# draws the edge straight through them (its label is still the shape the consumer reads).
_LAYOUT_OPS = {"view", "reshape", "unsafe_view", "transpose", "t", "permute", "unsqueeze", "squeeze", "expand",
               "expand_as", "contiguous", "clone", "alias", "detach", "lift_fresh_copy", "flatten", "unflatten",
               "view_as", "size", "dim", "getattr", "numel"}
# Ops that are no-ops when their output has the input's shape and dtype (HF's ``.to(dtype)``, full slices).
_MAYBE_NOOP_OPS = {"to", "to_copy", "type_as", "slice", "float", "type"}
_DTYPE_NAMES = ("f16", "bf16", "f64", "i64", "i32", "i16", "i8", "u8", "bool", "c64", "f32")


def _registered(method: str):
    try:
        return PeftRegistry.get(method)
    except FxPeftError:
        return None


def _method_colors(method: str, methods: list[str]) -> tuple[str, str]:
    """A method's own colours (``Method.color``); an unregistered one takes one from a spare palette."""
    m = _registered(method)
    if m is not None:
        return m.color
    spare = [x for x in methods if _registered(x) is None]
    return _SPARE_COLORS[spare.index(method) % len(_SPARE_COLORS)] if method in spare else _SPARE_COLORS[0]


def _method_name(method: str) -> str:
    m = _registered(method)
    return m.display_name if m is not None else method


_ROLE_TITLES = {"out": "+ {name}", "scale": "× scaling", "dropout": "dropout", "cast": "cast",
                "down": "{name} A", "up": "{name} B", "down_weight": "{name} A", "up_weight": "{name} B",
                "down_cat": "{name} A cat", "down_split": "{name} A split", "down_part": "{name} A part",
                "scaling": "scaling", "base_weight": "W", "base_bias": "bias"}


def _role_title(tag: dict) -> str:
    """``down`` -> ``LoRA A``, ``down_cat`` -> ``LoRA A cat``, ``out`` -> ``+ LoRA``, ``scale`` -> ``× scaling``."""
    name, role = _method_name(tag["method"]), tag["role"]
    return _ROLE_TITLES.get(role, f"{name} {role.replace('_', ' ')}").format(name=name)


_SYMBOL = re.compile(r"^[A-Za-z_]\w*$")


class _ShapeFmt:
    """Formats shapes as ``s72×s70×64``; a long symbolic dim (``((s53 - 1)//2) + 1``) gets a short alias.

    The aliases (``e1``, ``e2``, …) are listed in the legend, so a conv's output stays one readable label.
    """

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}

    def dim(self, d: Any) -> str:
        text = str(d).replace(" ", "")
        if isinstance(d, int) or len(text) <= 9 or _SYMBOL.match(text):
            return text
        if text not in self.aliases:
            self.aliases[text] = f"e{len(self.aliases) + 1}"
        return self.aliases[text]

    def __call__(self, shape: tuple | None) -> str:
        return "" if shape is None else "×".join(self.dim(x) for x in shape) if shape else "scalar"


# --------------------------------------------------------------------------------------------------------
# the scene: which nodes are drawn, in which clusters, with which edges
# --------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Cluster:
    path: str
    cls: str
    depth: int
    parent: _Cluster | None
    children: dict[str, _Cluster] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)  # drawn nodes directly inside
    run: list[str] = field(default_factory=list)  # the paths this cluster stands for, when it is a folded run

    def walk(self):
        yield self
        for c in self.children.values():
            yield from c.walk()

    def all_nodes(self) -> list[str]:
        return [n for c in self.walk() for n in c.nodes]

    def relpath(self) -> str:
        if self.parent is not None and self.parent.path and self.path.startswith(self.parent.path + "."):
            return self.path[len(self.parent.path) + 1:]
        return self.path


def _union_diff(before: nx.DiGraph, after: nx.DiGraph) -> nx.DiGraph:
    """One graph holding ``after`` plus what ``before`` had and ``after`` lost, with a ``diff`` mark per node.

    Nodes are matched by FX name (passes keep the names of the nodes they do not touch) and must also agree
    on op and target; a name reused for another op counts as removed and added.
    """
    g = after.copy()
    same = {n for n in after if n in before and (before.nodes[n]["op"], before.nodes[n]["target"])
            == (after.nodes[n]["op"], after.nodes[n]["target"])}
    for n in g:
        g.nodes[n]["diff"] = None if n in same else "added"
    ids: dict[str, str] = {}
    last = -1.0
    for k, n in enumerate(sorted(before, key=lambda x: before.nodes[x]["order"])):
        if n in same:
            ids[n], last = n, after.nodes[n]["order"]
            continue
        ids[n] = n if n not in g else f"{n} (before)"
        # Order a removed node right after the last kept node that preceded it, so it is drawn where it was.
        g.add_node(ids[n], **dict(before.nodes[n], diff="removed", order=last + 1e-3 * (k + 1) / (len(before) + 1)))
    for u, v in g.edges:  # an edge is new if it joins a new node or rewires two old ones
        g.edges[u, v]["diff"] = None if u in same and v in same and before.has_edge(u, v) else "added"
    for u, v in before.edges:
        if not (u in same and v in same and after.has_edge(u, v)) and ids[u] in g and ids[v] in g:
            g.add_edge(ids[u], ids[v], diff="removed")
    return g


def _worse(a: str | None, b: str | None) -> str | None:
    """Combine the diff marks along one path: removed beats added beats unchanged."""
    return "removed" if "removed" in (a, b) else "added" if "added" in (a, b) else None


def _better(a: str | None, b: str | None) -> str | None:
    """Combine the diff marks of two paths between the same ends: unchanged beats added beats removed."""
    return None if None in (a, b) else "added" if "added" in (a, b) else "removed"


def _hidden(g: nx.DiGraph, compact: bool) -> set[str]:
    hide = set()
    for n, d in g.nodes(data=True):
        if d["op"] in ("placeholder", "output"):
            continue
        if d["op"] == "call_module" and d["target"] == "_guards_fn":
            hide.add(n)  # torch.export's input guard: no data flows through it
            continue
        if d["op"] == "get_attr" and d.get("value") is None and d.get("param_shape") is None:
            hide.add(n)  # a higher-order op's subgraph module: shown by the op that calls it
            continue
        if not compact:
            continue
        if d["op"] == "get_attr":
            hide.add(n)
            continue
        op = d["opname"]
        if d["value"] == "scalar" or op.startswith("assert") or op.startswith("sym_") or op in (
                "_assert_scalar", "sym_constrain_range_for_size"):
            hide.add(n)
        elif d["adapter"] is None and op in _LAYOUT_OPS:
            hide.add(n)
        elif d["adapter"] is None and op in _MAYBE_NOOP_OPS:
            preds = [p for p in g.predecessors(n) if g.nodes[p]["shape"] is not None]
            if len(preds) == 1 and (g.nodes[preds[0]]["shape"], g.nodes[preds[0]]["dtype"]) == (d["shape"], d["dtype"]):
                hide.add(n)
    return hide


@dataclass
class _Scene:
    g: nx.DiGraph
    drawn: list[str]  # FX node names that are drawn, in graph order
    edges: dict[tuple[str, str], set[tuple[str, bool, str | None]]]  # (src, dst) -> {(label, worth printing, diff)}
    params: dict[str, list[tuple]]  # drawn node -> shapes of the parameters it reads
    root: _Cluster
    cluster_of: dict[str, _Cluster]
    dtype: str | None  # the graph's usual dtype: edges say theirs only when it differs
    fmt: _ShapeFmt
    member: dict[str, dict[int, int]] = field(default_factory=dict)  # node -> {run id: member index}
    rep: dict[str, str] = field(default_factory=dict)  # node of a folded member -> its node in the drawn member
    preds: dict[str, list[str]] = field(default_factory=dict)  # drawn node -> drawn nodes it reads
    succs: dict[str, list[str]] = field(default_factory=dict)  # drawn node -> drawn nodes that read it


def _size_only_groups(g: nx.DiGraph, drawn: list[str], sources: dict[str, set[str]], reads_params: set[str]) -> None:
    """Replace each clump of ops computed from sizes alone (masks, position ids) by one node, in place.

    HF models build their causal mask and position ids from ``arange``s of the input's sizes: dozens of
    nodes, none on the path of the data. Their inputs are only sizes (hidden scalars), so none of them has
    a drawn source that carries data; a connected clump of three or more in one module becomes one node.
    """
    size_only: set[str] = set()
    for n in drawn:
        d = g.nodes[n]
        if (d["op"] in ("call_function", "call_method") and not d["adapter"] and not d.get("diff")
                and n not in reads_params and all(s in size_only for s in sources[n])):
            size_only.add(n)
    if len(size_only) < 3:
        return
    sub = nx.Graph()
    sub.add_nodes_from(size_only)
    for n in size_only:
        sub.add_edges_from((s, n) for s in sources[n] if g.nodes[s]["module"] == g.nodes[n]["module"])
    for i, comp in enumerate(nx.connected_components(sub)):
        if len(comp) < 3:
            continue
        members = sorted(comp, key=lambda x: g.nodes[x]["order"])
        first = g.nodes[members[0]]
        ops = list(dict.fromkeys(g.nodes[m]["opname"] for m in members))
        gid = f"sizes:{first['module']}:{i}"
        g.add_node(gid, **dict(first, opname="from sizes", target=", ".join(ops), group=members, site=None,
                               shape=g.nodes[members[-1]]["shape"], dtype=g.nodes[members[-1]]["dtype"]))
        for m in members:
            g.nodes[m]["grouped_into"] = gid


def _scene(g: nx.DiGraph, compact: bool) -> _Scene:
    hide = _hidden(g, compact)
    order = sorted(g, key=lambda n: g.nodes[n]["order"])
    memo: dict[str, dict[str, str | None]] = {}

    def sources(n: str) -> dict[str, str | None]:
        """The drawn nodes whose data ``n``'s value comes from, each with the diff mark of the path from it."""
        if n not in hide:
            return {n: None}
        if n not in memo:
            d = g.nodes[n]
            memo[n] = {}
            # A parameter is shown on its reader; a size (SymInt) is shape bookkeeping, not data flow.
            if d["op"] != "get_attr" and d["value"] != "scalar":
                for p in g.predecessors(n):
                    for src, mark in sources(p).items():
                        mark = _worse(mark, g.edges[p, n].get("diff"))
                        memo[n][src] = _better(memo[n][src], mark) if src in memo[n] else mark
        return memo[n]

    def params_of(n: str) -> list[tuple]:  # parameters read directly or through hidden views (W.t()), in arg order
        d = g.nodes[n]
        if d["op"] == "call_module" and d["param_shape"] is not None:
            return [d["param_shape"]]
        out, stack, seen = [], list(g.predecessors(n))[::-1], set()
        while stack:
            p = stack.pop()
            if p in seen or p not in hide:
                continue
            seen.add(p)
            if g.nodes[p]["op"] == "get_attr":
                if g.nodes[p]["param_shape"] is not None:
                    out.append(g.nodes[p]["param_shape"])
            elif g.nodes[p]["opname"] in _LAYOUT_OPS or g.nodes[p]["opname"] in _MAYBE_NOOP_OPS:
                stack.extend(list(g.predecessors(p))[::-1])
        return out

    drawn = [n for n in order if n not in hide]
    params = {v: params_of(v) for v in drawn}
    srcs = {v: {x for p in g.predecessors(v) for x in sources(p)} for v in drawn}
    if compact:
        _size_only_groups(g, drawn, srcs, {v for v in drawn if params[v]})

    def shown(n: str) -> str:
        return g.nodes[n].get("grouped_into", n)

    dtypes = Counter(d["dtype"] for _, d in g.nodes(data=True) if d["dtype"] and d["value"] == "tensor")
    usual = max(("f32", "bf16", "f16", "f64"), key=lambda t: dtypes.get(t, 0)) if dtypes else None

    def in_shape(n: str):  # the shape of a node's first input that has one
        for p in g.predecessors(n):
            if g.nodes[p]["shape"] is not None and g.nodes[p]["value"] == "tensor":
                return g.nodes[p]["shape"]
        return None

    fmt = _ShapeFmt()
    edges: dict[tuple[str, str], set[tuple[str, bool, str | None]]] = defaultdict(set)
    for v in drawn:
        for p in g.predecessors(v):
            edge_mark = g.edges[p, v].get("diff")
            d = g.nodes[p]
            label = fmt(d["shape"]) if d["shape"] is not None and d["value"] == "tensor" else ""
            if label and d["dtype"] and d["dtype"] != usual:
                label += f" {d['dtype']}"
            # Worth printing where the shape changes, where data enters, and along an adapter.
            telling = (d["op"] == "placeholder" or d["shape"] != in_shape(p) or bool(d["adapter"])
                       or bool(g.nodes[v]["adapter"]) or label.endswith(tuple(f" {t}" for t in _DTYPE_NAMES)))
            for src, mark in sources(p).items():
                a, b = shown(src), shown(v)
                if a != b:
                    edges[(a, b)].add((label, telling, _worse(mark, edge_mark)))
    drawn = list(dict.fromkeys(shown(n) for n in drawn))
    params = {shown(n): p for n, p in params.items() if p}
    if compact:  # a node with no drawn edge at all (an unused arange) says nothing
        linked = {x for e in edges for x in e}
        drawn = [n for n in drawn if n in linked or g.nodes[n]["op"] in ("placeholder", "output")
                 or g.nodes[n]["adapter"] or g.nodes[n].get("diff")]

    root = _Cluster("", g.graph.get("name", ""), 0, None)
    cluster_of: dict[str, _Cluster] = {}
    for n in drawn:
        d = g.nodes[n]
        stack = d["module_stack"][:-1] if d["adapter"] else d["module_stack"]  # adapters sit in their site's cluster
        c = root
        for path, cls in stack:
            if path not in c.children:
                c.children[path] = _Cluster(path, cls, c.depth + 1, c)
            c = c.children[path]
        c.nodes.append(n)
        cluster_of[n] = c
    return _Scene(g, drawn, dict(edges), params, root, cluster_of, usual, fmt)


_INDEXED = re.compile(r"^(?:(.*)\.)?(\d+)$")  # "model.layers.3" -> ("model.layers", "3"); "3" -> (None, "3")


def _signature(scene: _Scene, c: _Cluster) -> tuple[tuple, list[str]]:
    """What a cluster draws, independent of its name: per node its place, op, adapter role, diff mark and inputs."""
    nodes = sorted(c.all_nodes(), key=lambda n: scene.g.nodes[n]["order"])
    index = {n: i for i, n in enumerate(nodes)}
    sig = []
    for n in nodes:
        d = scene.g.nodes[n]
        where = scene.cluster_of[n].path[len(c.path):]
        ins = tuple(sorted(index.get(s, -1) for s in scene.preds.get(n, ())))
        tag = (d["adapter"]["method"], d["adapter"]["role"]) if d["adapter"] else None
        sig.append((where, d["opname"], tag, d.get("diff"), ins, tuple(map(tuple, scene.params.get(n, [])))))
    return tuple(sig), nodes


def _is_pipe(scene: _Scene, run: set[str]) -> bool:
    """Whether ``run`` (the nodes of consecutive blocks) is a pipe: everything it reads from outside comes
    before it, and everything outside that reads it comes after it.

    Only then does drawing one block stand for all of them. A symbolic_trace graph can leave a block's
    glue (the ``gelu`` between two of its projections) outside its cluster; folding that would lie.
    """
    order = scene.g.nodes
    lo = min(order[n]["order"] for n in run)
    hi = max(order[n]["order"] for n in run)
    for v in run:
        if any(s not in run and order[s]["order"] > lo for s in scene.preds.get(v, ())):
            return False
    for s in run:
        if any(v not in run and order[v]["order"] < hi for v in scene.succs.get(s, ())):
            return False
    return True


def _fold_repeats(scene: _Scene) -> None:
    """Draw each run of identical sibling blocks (``layers.0``, ``layers.1``, …) once, as its first member.

    Nodes of the other members map to the matching node of the drawn one; edges between two members of a
    run (layer i feeding layer i+1) are dropped, and every other edge moves to the drawn member.
    """
    scene.preds, scene.succs = defaultdict(list), defaultdict(list)
    for (s, v) in scene.edges:
        scene.preds[v].append(s)
        scene.succs[s].append(v)
    run_id = 0
    todo = [scene.root]
    while todo:
        c = todo.pop()
        groups: dict[tuple, list[tuple[int, _Cluster]]] = defaultdict(list)
        for child in c.children.values():
            m = _INDEXED.match(child.path)
            if m:
                groups[(m.group(1) or "", child.cls)].append((int(m.group(2)), child))
        for members in groups.values():
            members.sort(key=lambda t: t[0])
            i = 0
            while i < len(members):
                sig0, nodes0 = _signature(scene, members[i][1])
                run_nodes = set(nodes0)
                j = i + 1
                while j < len(members) and members[j][0] == members[j - 1][0] + 1:
                    sig, nodes = _signature(scene, members[j][1])
                    if sig != sig0 or not _is_pipe(scene, run_nodes | set(nodes)):
                        break
                    run_nodes |= set(nodes)
                    j += 1
                if j - i > 1:
                    run_id += 1
                    first = members[i][1]
                    first.run = [m.path for _, m in members[i:j]]
                    for k, (_, m) in enumerate(members[i:j]):
                        _, nodes = _signature(scene, m)
                        for a, b in zip(nodes, nodes0):
                            scene.member.setdefault(a, {})[run_id] = k
                            if k:
                                scene.rep[a] = b
                        if k:
                            del c.children[m.path]
                i = j
        todo.extend(c.children.values())
    # Resolve chains (a node of a folded run inside a folded run) and rewrite the edges.
    def rep(n: str) -> str:
        while n in scene.rep:
            n = scene.rep[n]
        return n

    edges: dict[tuple[str, str], set[tuple[str, bool, str | None]]] = defaultdict(set)
    for (s, v), labels in scene.edges.items():
        ms, mv = scene.member.get(s, {}), scene.member.get(v, {})
        if any(ms[r] != mv[r] for r in ms.keys() & mv.keys()):
            continue  # member i -> member j of one run: the repetition itself
        a, b = rep(s), rep(v)
        if a != b:
            edges[(a, b)] |= labels
    scene.edges = dict(edges)
    kept = set(scene.rep)
    scene.drawn = [n for n in scene.drawn if n not in kept]


def _marked(scene: _Scene) -> set[int]:
    """Ids of the clusters that hold an adapter node or a node the diff marks (and of their ancestors)."""
    out: set[int] = set()
    for n in scene.drawn:
        d = scene.g.nodes[n]
        if d["adapter"] or d.get("diff"):
            c: _Cluster | None = scene.cluster_of[n]
            while c is not None and id(c) not in out:
                out.add(id(c))
                c = c.parent
    return out


def _cut(c: _Cluster, depth: int, focus: set[int] | None = None) -> _Cluster | None:
    """The outermost cluster on ``c``'s chain drawn as a box, or None when ``c`` is drawn open.

    A cluster is boxed when it is deeper than ``depth`` or, with ``focus`` (the marked clusters), when it
    is below the top level and holds nothing marked: the picture opens what the surgery touched.
    A cluster around a single node is never boxed: the node itself is as small, and says more.
    """
    chain = []
    while c.parent is not None:
        chain.append(c)
        c = c.parent
    for x in reversed(chain):
        if not x.children and len(x.nodes) == 1:
            return None
        if x.depth > depth or (focus is not None and x.depth >= 2 and id(x) not in focus):
            return x
    return None


def _auto_depth(scene: _Scene, max_nodes: int, focus: set[int] | None) -> int:
    """The deepest level whose drawing has at most ``max_nodes`` boxes and nodes (at least the top level)."""
    deepest = max((c.depth for c in scene.root.walk()), default=0)
    for depth in range(deepest, 0, -1):
        boxes, count = set(), 0
        for n in scene.drawn:
            cut = _cut(scene.cluster_of[n], depth, focus)
            if cut is None:
                count += 1
            else:
                boxes.add(id(cut))
        if count + len(boxes) <= max_nodes:
            return depth
    return 0


# --------------------------------------------------------------------------------------------------------
# DOT
# --------------------------------------------------------------------------------------------------------


def _q(s: Any) -> str:
    """A DOT double-quoted string."""
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(**kw: Any) -> str:
    parts = []
    for k, v in kw.items():
        if v is None:
            continue
        if isinstance(v, _Html):
            parts.append(f"{k}=<{v.text}>")
        else:
            parts.append(f"{k}={_q(v)}")
    return "[" + " ".join(parts) + "]"


@dataclass(frozen=True)
class _Html:
    text: str


def _e(s: Any) -> str:
    return html.escape(str(s), quote=False)


_CLUSTER_FILLS = ["#f8f9fa", "#f1f3f5", "#e9ecef", "#f8f9fa", "#f1f3f5", "#e9ecef"]


class _View:
    """What every part of the drawing shares: the scene, where the depth cut falls, the methods drawn.

    Built once per drawing; the parts below (:class:`_NodeLabels`, :class:`_ModuleBoxes`, :class:`_Edges`,
    :func:`_legend`, :func:`_caption`) only read it.
    """

    def __init__(self, scene: _Scene, depth: int, focus: set[int] | None, shapes: bool | str) -> None:
        self.s, self.depth, self.focus, self.shapes = scene, depth, focus, shapes
        g = scene.g
        self.methods = sorted({d["adapter"]["method"] for _, d in g.nodes(data=True) if d["adapter"]})
        self.diff = any(d.get("diff") for _, d in g.nodes(data=True))
        self.adapter_names = {d["adapter"]["adapter"] for _, d in g.nodes(data=True) if d["adapter"]}
        # Map every drawn node to what stands for it: itself, or the box of the collapsed cluster holding it.
        self.box_of: dict[str, _Cluster] = {}
        for n in scene.drawn:
            cut = _cut(scene.cluster_of[n], depth, focus)
            if cut is not None:
                self.box_of[n] = cut

    def node_id(self, n: str) -> str:
        box = self.box_of.get(n)
        return f"box:{box.path}" if box is not None else n

    def colors(self, method: str) -> tuple[str, str]:
        return _method_colors(method, self.methods)

    def adapters_in(self, c: _Cluster, removed: bool = False) -> Counter:
        """Adapters (one per adapter module) in ``c``'s subtree, per method.

        A folded run inside ``c`` counts once per block it stands for (``c``'s own run does not: its box
        says "each"). With ``removed``, adapters a diffed pass removed count too.
        """
        g = self.s.g
        times: dict[tuple[str, str], int] = {}
        stack = [(c, 1)]
        while stack:
            x, mult = stack.pop()
            for n in x.nodes:
                d = g.nodes[n]
                tag = d["adapter"]
                if tag is not None and (removed or d.get("diff") != "removed"):
                    key = (tag["method"], tag["module"])
                    times[key] = max(times.get(key, 0), mult)
            stack.extend((k, mult * (len(k.run) if k.run else 1)) for k in x.children.values())
        counts: Counter = Counter()
        for (method, _), mult in times.items():
            counts[method] += mult
        return counts

    def run_label(self, c: _Cluster) -> str:
        """A cluster's name relative to its parent; a folded run's says which blocks (``layers.0…15``)."""
        if not c.run:
            return c.relpath()
        m = _INDEXED.match(c.relpath())
        first, last = _INDEXED.match(c.run[0]), _INDEXED.match(c.run[-1])
        if m and first and last:
            return (f"{m.group(1)}." if m.group(1) else "") + f"{first.group(2)}…{last.group(2)}"
        return c.relpath()


class _NodeLabels:
    """Draws one FX node as a box: colours by what it is (graph input/output, adapter node in its method's
    colours, site, plain op), a bold title, grey sub-lines, the diff mark, and a tooltip with the details."""

    def __init__(self, view: _View) -> None:
        self.v = view

    def line(self, n: str, alone_in: _Cluster | None = None) -> str:
        """The node's DOT line; ``alone_in`` is the one-node cluster it is drawn instead of (named in the title)."""
        d = self.v.s.g.nodes[n]
        tag = d["adapter"]
        attrs: dict[str, Any] = {"shape": "box", "style": "rounded,filled", "fillcolor": "white", "color": "#868e96"}
        title, sub = self._look(n, alone_in, attrs)
        title = self._mark_diff(d.get("diff"), title, attrs)
        label = f"<b>{_e(title)}</b>" + "".join(f'<br/><font point-size="8" color="#495057">{_e(x)}</font>'
                                                  for x in sub)
        attrs.update(label=_Html(label), tooltip=self._tooltip(n))
        if tag is not None:
            attrs["class"] = f"adapter {tag['method']}"  # lets SVG viewers style or hide one method
        return f"{_q(n)} {_attrs(**attrs)}"

    def _look(self, n: str, alone_in: _Cluster | None, attrs: dict[str, Any]) -> tuple[str, list[str]]:
        """Title and sub-lines by what the node is; sets its colours in ``attrs``."""
        d = self.v.s.g.nodes[n]
        if d["op"] in ("placeholder", "output"):
            attrs.update(fillcolor="#d0ebff", color="#1971c2", style="filled")
            sub = []
            if d["op"] == "placeholder" and d["shape"] is not None:  # what the graph is fed
                sub.append(self.v.s.fmt(d["shape"]) + (f" {d['dtype']}" if d["dtype"] != self.v.s.dtype else ""))
            return d["opname"], sub
        if d["adapter"] is not None:
            return self._adapter_look(n, d["adapter"], attrs)
        if d["site"]:
            return self._site_look(n, alone_in, attrs)
        if d.get("group"):  # a clump of size-only ops (masks, position ids) drawn as one node
            ops = d["target"].split(", ")
            return f"{len(d['group'])} ops on sizes", [", ".join(ops[:3]) + (", …" if len(ops) > 3 else "")]
        if alone_in is not None:
            return f"{alone_in.relpath()}: {d['opname']}", []
        return d["opname"], []

    def _adapter_look(self, n: str, tag: dict, attrs: dict[str, Any]) -> tuple[str, list[str]]:
        """An adapter node: its role in the method's words (``LoRA A``), and which site(s) it serves."""
        fill, border = self.v.colors(tag["method"])
        attrs.update(fillcolor=fill, color=border)
        sub: list[str] = []
        fused = tag.get("fused") or ()
        if tag["role"] == "out":  # the node that joins the base: say which site it adapts
            sub.append(tag["site"].rsplit(".", 1)[-1])
        elif len(fused) > 1:  # shared by sibling sites (q/k/v): name them all
            sub.append("fused " + ", ".join(site.rsplit(".", 1)[-1] for site in tag.get("fused_sites", fused)))
        if len(self.v.adapter_names) > 1:
            sub.append(f"adapter {tag['adapter']}")
        shapes = self.v.s.params.get(n)
        if shapes:
            sub.append(" + ".join(self.v.s.fmt(p) for p in shapes[:3]) + (" + …" if len(shapes) > 3 else ""))
        return _role_title(tag), sub

    def _site_look(self, n: str, alone_in: _Cluster | None, attrs: dict[str, Any]) -> tuple[str, list[str]]:
        """A site (a call that applies a base weight): grey and bold, with its weight's shape."""
        d = self.v.s.g.nodes[n]
        attrs.update(fillcolor="#e9ecef", color="#343a40", penwidth="1.5")
        leaf = d["site"].rsplit(".", 1)[-1]
        # Inside its own cluster the frame already names the site; elsewhere the title must.
        title = f"{leaf}: {d['opname']}" if alone_in is not None or not self._inside_own_cluster(n) else d["opname"]
        shapes = self.v.s.params.get(n)
        if not shapes:
            return title, []
        # The weight: the first matrix (or kernel) the call reads; a bias comes after it or is 1-D.
        return title, ["W " + self.v.s.fmt(next((p for p in shapes if len(p) >= 2), shapes[0]))]

    def _inside_own_cluster(self, n: str) -> bool:
        c = self.v.s.cluster_of[n]
        return bool(c.path) and c.path == self.v.s.g.nodes[n]["site"]

    @staticmethod
    def _mark_diff(diff: str | None, title: str, attrs: dict[str, Any]) -> str:
        """Green border and ``+`` for what the pass added; red, dashed and ``−`` for what it removed."""
        if diff == "added":
            attrs.update(color=_ADDED, penwidth="2.5")
            return "+ " + title if not title.startswith("+") else title
        if diff == "removed":
            attrs.update(color=_REMOVED, penwidth="2", style=attrs["style"] + ",dashed", fontcolor="#868e96")
            return "− " + title
        return title

    def _tooltip(self, n: str) -> str:
        """Everything the label leaves out: FX op and target, module, site, adapter, value, diff."""
        d = self.v.s.g.nodes[n]
        tag = d["adapter"]
        tip = [f"{d['op']} {n}", f"target: {d['target']}"]
        if d["module"]:
            tip.append(f"module: {d['module']} ({d['module_class']})")
        if d["site"]:
            tip.append(f"site: {d['site']}")
        if tag is not None:
            tip.append(f"adapter: {tag['adapter']} ({tag['method']}) on {tag['site']}, role {tag['role']}")
        if d["shape"] is not None:
            tip.append(f"value: {'×'.join(map(str, d['shape']))} {d['dtype']}")
        if d.get("diff"):
            tip.append(f"diff: {d['diff']}")
        return "\n".join(tip)


class _ModuleBoxes:
    """Draws the module tree: each module either as an open cluster (a labelled frame around its nodes,
    bordered in the colour of the adapters inside) or, past the depth cut, as one box summarising it."""

    def __init__(self, view: _View, nodes: _NodeLabels) -> None:
        self.v, self.nodes = view, nodes

    def lines(self, c: _Cluster, indent: str) -> list[str]:
        """DOT lines for ``c``'s own nodes and, recursively, its children."""
        out = [indent + self.nodes.line(n) for n in c.nodes]
        for k in c.children.values():
            if not k.children and len(k.nodes) == 1 and not self.v.adapters_in(k, removed=True) and not k.run:
                # A cluster around one node is noise: draw the node, named after its module.
                out.append(indent + self.nodes.line(k.nodes[0], k))
            elif _cut(k, self.v.depth, self.v.focus) is k:
                out.append(indent + self.box(k))
            else:
                out.append(f"{indent}subgraph {_q('cluster_' + k.path)} {{")
                out.extend(f"{indent}  {a}=<{v.text}>;" if isinstance(v, _Html) else f"{indent}  {a}={_q(v)};"
                           for a, v in self._frame(k).items())
                out.extend(self.lines(k, indent + "  "))
                out.append(f"{indent}}}")
        return out

    def _frame(self, k: _Cluster) -> dict[str, Any]:
        """An open cluster's attributes: path and class, ``×N`` for a folded run, border by the adapters inside."""
        methods = self.v.adapters_in(k, removed=True)
        border = self.v.colors(sorted(methods)[0])[1] if methods else "#adb5bd"
        label = f"<b>{_e(self.v.run_label(k))}</b>"
        if k.run:
            label += f' <font color="#c92a2a"><b>×{len(k.run)}</b></font>'
        label += f' <font color="#495057">{_e(k.cls)}</font>'
        if k.run:
            label += f'<br/><font point-size="8" color="#c92a2a">{len(k.run)} identical blocks, drawn once</font>'
        fill = _CLUSTER_FILLS[min(k.depth, len(_CLUSTER_FILLS) - 1)]
        return dict(label=_Html(label), style="rounded,filled" + (",bold" if k.run or methods else ""),
                    fillcolor=fill, color=border, tooltip=f"{k.path} ({k.cls})", labeljust="l",
                    penwidth="2.5" if k.run else ("1.5" if methods else "1"))

    def box(self, c: _Cluster) -> str:
        """A collapsed module as one box: name, class, op count, its adapters per method, and the diff counts
        (so collapsing never hides that the surgery touched it)."""
        nodes = c.all_nodes()
        g = self.v.s.g
        rows = [f"<b>{_e(self.v.run_label(c))}</b>" + (f' <font color="#c92a2a"><b>×{len(c.run)}</b></font>' if c.run else ""),
                f'<font point-size="8" color="#495057">{_e(c.cls)} · {len(nodes)} ops</font>']
        border = "#495057"
        for method, count in sorted(self.v.adapters_in(c).items()):
            edge = border = self.v.colors(method)[1]
            each = " each" if c.run else ""
            rows.append(f'<font point-size="9" color="{edge}"><b>{_method_name(method)} ×{count}{each}</b></font>')
        added = sum(1 for n in nodes if g.nodes[n].get("diff") == "added")
        removed = sum(1 for n in nodes if g.nodes[n].get("diff") == "removed")
        color = border
        if added or removed:
            rows.append(f'<font point-size="8"><font color="{_ADDED}">+{added}</font> '
                        f'<font color="{_REMOVED}">−{removed}</font> nodes</font>')
            color = _ADDED if added and not removed else _REMOVED if removed and not added else border
        tip = f"{c.path} ({c.cls}), collapsed: {len(nodes)} drawn ops" + (
            f"; stands for {len(c.run)} identical blocks {c.run[0]} … {c.run[-1]}" if c.run else "")
        fill = _CLUSTER_FILLS[min(c.depth, len(_CLUSTER_FILLS) - 1)]
        attrs = dict(shape="box", style="filled,bold", fillcolor=fill, color=color, label=_Html("<br/>".join(rows)),
                     tooltip=tip, peripheries="2" if c.run else None)
        return f"{_q('box:' + c.path)} {_attrs(**attrs)}"


class _Edges:
    """Draws the data flow between what is drawn (a node, or the box standing for its module).

    Many FX edges can land on one drawn edge (everything into a collapsed box); it then carries their
    shapes ("+N" more) and is unchanged if any of them is, added or removed otherwise.
    """

    def __init__(self, view: _View) -> None:
        self.v = view

    def lines(self) -> list[str]:
        labels_of, marks, method_of = self._merge()
        out = []
        for key, mark in marks.items():
            attrs: dict[str, Any] = {}
            lab = sorted(labels_of[key])
            if self.v.shapes and lab:
                attrs["label"] = lab[0] if len(lab) == 1 else f"{lab[0]} (+{len(lab) - 1})"
            if mark == "removed":
                attrs.update(color=_REMOVED, style="dashed")
            elif mark == "added":
                attrs.update(color=_ADDED)
            elif key in method_of:
                attrs.update(color=self.v.colors(method_of[key])[1])
            out.append(f"  {_q(key[0])} -> {_q(key[1])} {_attrs(**attrs) if attrs else ''}".rstrip())
        return out

    def _merge(self):
        """Per drawn edge: the shape labels worth printing, the diff mark, and the method whose colour it takes."""
        s, v = self.v.s, self.v
        drawn_ids = {v.node_id(n) for n in s.drawn}
        labels_of: dict[tuple[str, str], set[str]] = defaultdict(set)
        marks: dict[tuple[str, str], str | None] = {}
        method_of: dict[tuple[str, str], str] = {}
        for (a, b), found in s.edges.items():
            ia, ib = v.node_id(a), v.node_id(b)
            if ia == ib or ia not in drawn_ids or ib not in drawn_ids:
                continue
            # A shape is printed where it says something, and always where the edge crosses a module boundary.
            crossing = v.box_of.get(a, s.cluster_of[a]) is not v.box_of.get(b, s.cluster_of[b])
            labels_of[(ia, ib)] |= {lab for lab, telling, _ in found
                                    if lab and (telling or crossing or v.shapes == "all")}
            for _, _, mark in found:
                marks[(ia, ib)] = _better(marks[(ia, ib)], mark) if (ia, ib) in marks else mark
            da, db = s.g.nodes[a], s.g.nodes[b]
            # Data flowing through an adapter takes its colour; the base output into the "out" add does not.
            if db["adapter"] and (da["adapter"] or db["adapter"]["role"] != "out") and ib == b:
                method_of[(ia, ib)] = db["adapter"]["method"]
        return labels_of, marks, method_of


def _legend(v: _View) -> str:
    """The legend node: one swatch per method drawn, the site and diff marks, folded runs, shape aliases."""
    rows = []
    for m in v.methods:
        rows.append(f'<tr><td bgcolor="{v.colors(m)[0]}" width="14"> </td><td align="left">{_e(_method_name(m))} adapter node</td></tr>')
    rows.append('<tr><td bgcolor="#e9ecef" width="14"> </td><td align="left">site (applies a base weight W)</td></tr>')
    if v.diff:
        rows.append(f'<tr><td border="2" color="{_ADDED}" width="14"> </td><td align="left"><font color="{_ADDED}">+ added</font> by the pass</td></tr>')
        rows.append(f'<tr><td border="2" color="{_REMOVED}" style="dashed" width="14"> </td><td align="left"><font color="{_REMOVED}">− removed</font> by the pass</td></tr>')
    if any(c.run for c in v.s.root.walk()):
        rows.append('<tr><td><font color="#c92a2a"><b>×N</b></font></td><td align="left">N identical blocks, drawn once</td></tr>')
    note = "edges: value shape" + (f" ({v.s.dtype} unless marked)" if v.s.dtype else "")
    rows.append(f'<tr><td colspan="2" align="left"><font point-size="8">{_e(note)}</font></td></tr>')
    # Symbolic dims by the input they come from, then the short aliases of long ones (see _ShapeFmt).
    dims = [f"{k} = {val}" for k, val in (v.s.g.graph.get("dims") or {}).items() if not k.isdigit()][:4]
    dims += [f"{val} = {k}" for k, val in v.s.fmt.aliases.items()][:6]
    for txt in dims:
        rows.append(f'<tr><td colspan="2" align="left"><font point-size="8">{_e(txt)}</font></td></tr>')
    table = '<table border="0" cellborder="1" cellspacing="2" cellpadding="3" bgcolor="white">' + \
        '<tr><td colspan="2"><b>legend</b></td></tr>' + "".join(rows) + "</table>"
    return f'"legend" [shape=plaintext margin=0 label=<{table}>]'


def _caption(v: _View) -> str:
    """The default caption: graph name, dialect, node count, the adapters per method, and the diff's counts."""
    g = v.s.g
    tags = [d["adapter"] for _, d in g.nodes(data=True) if d["adapter"] and d.get("diff") != "removed"]
    parts = []
    for m in sorted({t["method"] for t in tags}):
        sites = len({t["site"] for t in tags if t["method"] == m})
        count = len({t["module"] for t in tags if t["method"] == m})
        where = f"{sites} site{'s' * (sites != 1)}"
        parts.append(f"{_method_name(m)} on {where}" if count == sites else
                     f"{count} {_method_name(m)} adapters on {where}")
    what = ", ".join(parts) or "no adapters"
    head = (f"{g.graph.get('name', 'graph')} · {g.graph.get('dialect', '')} graph · "
            f"{sum(1 for _, d in g.nodes(data=True) if d.get('diff') != 'removed')} FX nodes · {what}")
    if v.diff:
        added = sum(1 for _, d in g.nodes(data=True) if d.get("diff") == "added" and not d.get("group"))
        removed = sum(1 for _, d in g.nodes(data=True) if d.get("diff") == "removed")
        head += f" · diff: +{added} / −{removed} FX nodes"
    return head


class _Dot:
    """Writes the scene as DOT text (faster and more predictable than a DOT builder for a few thousand lines):
    graph attributes, the legend, the module tree with its nodes, then the edges."""

    def __init__(self, scene: _Scene, depth: int, focus: set[int] | None, rankdir: str, shapes: bool | str,
                 title: str | None) -> None:
        self.view = _View(scene, depth, focus, shapes)
        self.title, self.rankdir = title, rankdir

    def render(self) -> str:
        v = self.view
        head = self.title if self.title is not None else _caption(v)
        lines = [
            "digraph fxpeft {",
            f"  graph [rankdir={_q(self.rankdir)} fontname=\"Helvetica\" fontsize=\"11\" nodesep=\"0.18\" "
            f"ranksep=\"0.28\" labelloc=\"t\" label={_q(head)} newrank=\"true\" tooltip={_q(head)}];",
            '  node [fontname="Helvetica" fontsize="10" height="0.3" margin="0.08,0.03"];',
            '  edge [fontname="Helvetica" fontsize="8" fontcolor="#868e96" color="#868e96" arrowsize="0.6"];',
        ]
        body = _ModuleBoxes(v, _NodeLabels(v)).lines(v.s.root, "  ")
        edges = _Edges(v).lines()
        # The legend goes first in the file but is built last: drawing the nodes may name more dim aliases.
        return "\n".join(lines + ["  " + _legend(v)] + body + edges + ["}"]) + "\n"


# --------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------


def _as_view(x: Any, what: str) -> nx.DiGraph:
    if isinstance(x, nx.DiGraph):
        if "opname" not in next(iter(x.nodes.values()), {"opname": 1}):
            raise DrawError(f"{what} is a networkx graph but not fxpeft's view of one; make it with fxpeft.to_networkx(gm)")
        return x
    if isinstance(x, (fx.GraphModule, fx.Graph)):
        return to_networkx(x)
    raise DrawError(f"{what} must be a torch.fx.GraphModule, an fx.Graph or fxpeft.to_networkx(gm); got {type(x).__name__}")


def to_dot(gm: fx.GraphModule | nx.DiGraph, *, depth: int | None = None, before: Any = None,
           fold_repeats: bool = True, compact: bool = True, shapes: bool | str = True, rankdir: str = "TB",
           max_nodes: int = 250, title: str | None = None) -> str:
    """The DOT source :func:`draw` renders (same arguments, without the path).

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.viz import to_dot
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> gm = fxpeft.rewrite(fxpeft.trace(mlp, (torch.randn(3, 4),)), fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> src = to_dot(gm)
        >>> src.startswith("digraph"), 'subgraph "cluster_0"' in src, "LoRA" in src
        (True, True, True)
    """
    if before is not None and (before is gm or (isinstance(gm, fx.GraphModule) and
                                                 getattr(before, "graph", before) is gm.graph)):
        raise DrawError(
            "before= is the graph being drawn: passes change a graph in place, so it no longer shows the "
            "'before'. Take a snapshot before the pass: before = fxpeft.to_networkx(gm) (cheap, no weights) "
            "or copy.deepcopy(gm).")
    if shapes not in (True, False, "all"):
        raise DrawError(f"shapes must be True (where they say something), 'all' or False; got {shapes!r}")
    if rankdir not in ("TB", "LR", "BT", "RL"):
        raise DrawError(f"rankdir must be one of TB, LR, BT, RL; got {rankdir!r}")
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 0):
        raise DrawError(f"depth must be a non-negative int (0 collapses every top-level module) or None (auto); got {depth!r}")
    g = _as_view(gm, "gm")
    if before is not None:
        g = _union_diff(_as_view(before, "before"), g)
    scene = _scene(g, compact)
    if fold_repeats:
        _fold_repeats(scene)
    focus = None
    if depth is None:
        focus = _marked(scene) or None
        depth = _auto_depth(scene, max_nodes, focus)
    return _Dot(scene, depth, focus, rankdir, shapes, title).render()


class GraphvizPackageNotFoundError(GraphvizNotFoundError):
    """The ``graphviz`` Python package is not installed (rendering drives ``dot`` through it); the graph's
    ``.dot`` source was written instead (``dot_path``). A :class:`~fxpeft.errors.GraphvizNotFoundError`, so
    one ``except`` covers both halves of a missing Graphviz."""


def _import_graphviz():
    """The ``graphviz`` package, or None when it is not installed (an optional dependency: ``.dot`` needs none)."""
    try:
        import graphviz
    except ImportError:
        return None
    return graphviz


def _package_missing_message(out: Path, dot_path: Path) -> str:
    return (f"the graphviz Python package is not installed, so {out.name} was not rendered; its DOT source is "
            f"in {dot_path}. Install it with `pip install graphviz` (and Graphviz's `dot` program: Debian/Ubuntu "
            f"`sudo apt-get install graphviz`, macOS `brew install graphviz`), then re-run, or draw to a .dot "
            f"file and render it yourself: dot -T{out.suffix.lstrip('.').lower()} {dot_path} -o {out}")


def _dot_missing_message(out: Path, dot_path: Path) -> str:
    return (f"Graphviz's `dot` program is not installed (not on PATH), so {out.name} was not rendered; its DOT "
            f"source is in {dot_path}. Install Graphviz (Debian/Ubuntu: `sudo apt-get install graphviz`; macOS: "
            f"`brew install graphviz`; conda: `conda install graphviz`), then re-run, or render the source "
            f"yourself: dot -T{out.suffix.lstrip('.').lower()} {dot_path} -o {out}")


def draw(gm: fx.GraphModule, path: str | os.PathLike, *, depth: int | None = None, before: Any = None,
         fold_repeats: bool = True, compact: bool = True, shapes: bool | str = True, rankdir: str = "TB",
         max_nodes: int = 250, title: str | None = None, dpi: int | None = None) -> Path:
    """Draw ``gm`` to ``path``; the format follows the extension (``.svg``, ``.png``, ``.pdf`` or ``.dot``).

    Args:
        gm: the graph (either dialect), or its :func:`fxpeft.to_networkx` view.
        path: the file to write. Missing parent directories are created.
        depth: module clusters deeper than this are drawn as one box each (0: every top-level module is a
            box). None (the default) picks the deepest level that draws at most ``max_nodes`` boxes and nodes,
            which with ``fold_repeats`` keeps a 16-layer model as readable as a 1-layer one.
        before: the same graph before a pass, for a diff: added nodes are drawn green, removed ones red and
            dashed. Passes change ``gm`` in place, so pass a snapshot taken before them:
            ``fxpeft.to_networkx(gm)`` (cheap: no tensors) or ``copy.deepcopy(gm)``.
        fold_repeats: draw a run of identical sibling blocks (``layers.0`` … ``layers.15``) once, marked ``×16``.
        compact: leave out parameter reads and pure shape plumbing (views, transposes, ``sym_size``, asserts);
            edges pass through them. False draws every FX node.
        shapes: label edges with the shape (and a dtype that differs from the graph's usual one) of the value
            where it says something: where data enters, where an op changes the shape, across a module
            boundary and along adapters. ``"all"`` labels every edge; False none.
        rankdir: Graphviz's layout direction: ``"TB"`` (top to bottom) or ``"LR"`` etc.
        max_nodes: the budget the automatic ``depth`` keeps to.
        title: the caption (default: graph name, dialect, node count and the adapters it holds).
        dpi: resolution of a ``.png``.

    Returns:
        The path written.

    Raises:
        GraphvizNotFoundError: Graphviz's ``dot`` is not installed; the DOT source was written next to
            ``path`` (as ``.dot``) and the message says how to install Graphviz.
        GraphvizPackageNotFoundError: the ``graphviz`` Python package is not installed (a subclass of
            ``GraphvizNotFoundError``; the DOT source was written too, and the message says ``pip install graphviz``).
        DrawError: an unsupported extension, a ``before=`` that is ``gm`` itself, or Graphviz failed.

    Example:
        >>> import copy, os, tempfile, torch, fxpeft
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> gm = fxpeft.trace(mlp, (torch.randn(3, 4),))
        >>> before = fxpeft.to_networkx(gm)               # a snapshot: rewrite changes gm in place
        >>> gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0", "2"]))
        >>> out = fxpeft.draw(gm, os.path.join(tempfile.mkdtemp(), "diff.dot"), before=before)
        >>> "+ LoRA" in out.read_text()
        True
    """
    out = Path(path)
    ext = out.suffix.lower()
    if ext not in _FORMATS:
        raise DrawError(f"cannot draw to {out.name!r}: the extension picks the format; use one of "
                        f"{', '.join(sorted(_FORMATS))}")
    src = to_dot(gm, depth=depth, before=before, fold_repeats=fold_repeats, compact=compact, shapes=shapes,
                 rankdir=rankdir, max_nodes=max_nodes, title=title)
    if dpi is not None:
        src = src.replace("digraph fxpeft {\n", f"digraph fxpeft {{\n  graph [dpi=\"{int(dpi)}\"];\n", 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = _FORMATS[ext]
    if fmt is None:
        out.write_text(src)
        return out
    graphviz = _import_graphviz()
    if graphviz is None:
        dot_path = out.with_suffix(".dot")
        dot_path.write_text(src)
        raise GraphvizPackageNotFoundError(_package_missing_message(out, dot_path), str(dot_path))
    if shutil.which("dot") is None:
        dot_path = out.with_suffix(".dot")
        dot_path.write_text(src)
        raise GraphvizNotFoundError(_dot_missing_message(out, dot_path), str(dot_path))
    try:
        data = graphviz.Source(src).pipe(format=fmt, engine="dot")
    except graphviz.ExecutableNotFound:  # removed between the check and the call
        dot_path = out.with_suffix(".dot")
        dot_path.write_text(src)
        raise GraphvizNotFoundError(_dot_missing_message(out, dot_path), str(dot_path)) from None
    except graphviz.CalledProcessError as e:
        detail = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        raise DrawError(f"Graphviz could not render {out.name}: {detail[0] if detail else e}") from e
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)  # never leave half a picture behind
    return out
