"""A networkx view of an fxpeft graph: the data model the visualiser draws, and a way to query a graph.

:func:`to_networkx` turns a ``torch.fx.GraphModule`` into a :class:`networkx.DiGraph` with one node per FX node
(keyed by the FX node's name) and one edge per data dependency. Node attributes say what each node is, which
module owns it, which adapter (if any) inserted it, which site it computes and what shape it has, so a
question about the graph becomes a few lines of networkx, for example "which sites read the same input?"
(:func:`sites_sharing_input`, used by fusion: q/k/v of an attention block).

The view is a plain-data snapshot: it holds no tensors and does not change when ``gm`` is later rewritten
or merged in place, which is what makes it the cheap ``before=`` of :func:`fxpeft.draw`'s diff mode.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from .sites import find_sites, graph_dialect
from .tags import get_tag, tag_dict

__all__ = ["to_networkx", "sites_sharing_input", "NODE_ATTRS"]

#: The attributes every node of :func:`to_networkx`'s graph carries.
NODE_ATTRS = ("op", "target", "opname", "module", "module_class", "module_stack", "adapter", "site", "shape",
              "dtype", "value", "param_shape", "order")

# torch.export records a placeholder frame for nodes outside any module; it is not a module.
_NOT_A_MODULE = "_empty_nn_module_stack_from_metadata_hook"

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "bool", torch.complex64: "c64"}


def _class_name(cls: Any) -> str:
    name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return name.rsplit(".", 1)[-1]


def _target_str(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return str(t)  # "aten.linear.default"
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    return f"{mod}.{name}" if mod and mod != "builtins" else name


def _opname(node: fx.Node, gm: fx.GraphModule) -> str:
    """A short, human name for what the node does: ``linear``, ``add``, ``conv2d``, ``Dropout``, ``input_ids``."""
    if node.op in ("placeholder", "output"):
        return node.name if node.op == "placeholder" else "output"
    if node.op == "get_attr":
        return node.target.rsplit(".", 1)[-1]
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(node.target)).__name__
        except AttributeError:
            return node.target
    if node.op == "call_method":
        return node.target
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        name = t.__name__.split(".")[0]  # "linear.default" -> "linear"
    else:
        name = getattr(t, "__name__", None) or str(t)
    return name.strip("_") or name


def _dim(d: Any) -> int | str:
    if isinstance(d, int):
        return d
    expr = getattr(getattr(d, "node", None), "expr", None)
    # A dim torch.export specialised (the model pinned it) is a SymInt with a constant value: print it as one.
    return int(expr) if expr is not None and getattr(expr, "is_number", False) else str(d)


def _describe_value(v: Any) -> tuple[tuple | None, str | None, str | None]:
    """(shape, dtype, kind) of a node's value; kind is "tensor", "scalar", "tuple" or None."""
    if isinstance(v, torch.Tensor):
        return tuple(_dim(d) for d in v.shape), _DTYPES.get(v.dtype, str(v.dtype).replace("torch.", "")), "tensor"
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
        return None, None, "scalar"
    if isinstance(v, (tuple, list)) and v:
        return None, None, "tuple"
    return None, None, None


def _node_value(node: fx.Node) -> Any:
    if "val" in node.meta:
        return node.meta["val"]
    tm = node.meta.get("tensor_meta")  # ShapeProp's record (symbolic_trace graphs that were shape-propagated)
    if tm is not None and hasattr(tm, "shape"):
        return torch.empty(0).new_empty(tuple(tm.shape), dtype=tm.dtype, device="meta")
    return None


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _fill_values(gm: fx.GraphModule, values: dict[fx.Node, Any]) -> None:
    """Give nodes without a recorded value (the ones fxpeft inserted) one, by running them on fake tensors.

    Export graphs record a FakeTensor for every node torch.export made; the nodes a pass inserted have none.
    Running just those nodes under the graph's own fake mode (symbolic batch/sequence dims included) costs
    milliseconds and gives the adapter edges shapes too. Graphs without any fake value (symbolic_trace) are
    left alone: there is nothing to propagate from.
    """
    missing = [n for n, v in values.items() if v is None and n.op in ("get_attr", "call_function", "call_module")]
    if not missing:
        return
    fakes = [v for v in values.values() if isinstance(v, torch._subclasses.FakeTensor)]
    if not fakes:
        return
    mode = fakes[0].fake_mode
    for n in missing:
        try:
            if n.op == "get_attr":
                t = _attr(gm, n.target)
                if isinstance(t, torch.Tensor):
                    values[n] = mode.from_tensor(t, static_shapes=True)
                continue
            args = fx.node.map_arg(n.args, lambda a: values.get(a))
            kwargs = fx.node.map_arg(n.kwargs, lambda a: values.get(a))
            if any(values.get(a) is None for a in n.all_input_nodes):
                continue
            if n.op == "call_module":
                mod = gm.get_submodule(n.target)
                # Only shape-preserving modules: running an arbitrary module on fakes could have side effects.
                if isinstance(mod, (nn.Dropout, nn.Identity)) and isinstance(args[0], torch.Tensor):
                    values[n] = args[0]
                continue
            with mode, torch.no_grad():
                values[n] = n.target(*args, **kwargs)
        except Exception:  # a shape is a nicety; a node we cannot run just has none
            continue


def _site_calls(gm: fx.GraphModule) -> dict[fx.Node, str]:
    try:
        return {c.node: s.name for s in find_sites(gm).values() for c in s.calls}
    except Exception:  # an unusual graph must still be drawable
        return {}


def _stacks(gm: fx.GraphModule, nodes: list[fx.Node], site_of: dict[fx.Node, str]) -> dict[fx.Node, tuple]:
    """Each node's owning-module stack: ``((path, class), ...)`` from the outermost module in, root excluded.

    Export graphs (and symbolic_trace graphs, for nodes inside a traced module) record ``nn_module_stack``.
    Nodes without one are placed by what they touch: a ``get_attr`` under the owner of its attribute, a site
    call under its site, an adapter node under the site it adapts (plus the adapter module itself).
    """
    known: dict[str, tuple] = {}  # module path -> its stack, learnt from every recorded stack

    def recorded(n: fx.Node) -> tuple:
        st = n.meta.get("nn_module_stack") or {}
        out = []
        for key, val in st.items():
            path, cls = val if isinstance(val, tuple) and len(val) == 2 else (key, "")
            if not path or key == _NOT_A_MODULE or path == _NOT_A_MODULE:
                continue
            out.append((path, _class_name(cls)))
        return tuple(out)

    rec = {n: recorded(n) for n in nodes}
    for st in rec.values():
        for i, (path, _) in enumerate(st):
            known.setdefault(path, st[: i + 1])

    def for_path(path: str) -> tuple:
        if not path:
            return ()
        if path in known:
            return known[path]
        parent = path.rpartition(".")[0]
        while parent and parent not in known:
            parent = parent.rpartition(".")[0]
        mod = _attr(gm, path)
        cls = type(mod).__name__ if isinstance(mod, nn.Module) else "Module"
        known[path] = (known[parent] if parent else ()) + ((path, cls),)
        return known[path]

    def site_owner(site: str) -> str:
        mod = _attr(gm, site)
        return site if isinstance(mod, nn.Module) else site.rpartition(".")[0]

    out: dict[fx.Node, tuple] = {}
    for n in nodes:
        tag = get_tag(n)
        if tag is not None:
            mod = _attr(gm, tag.module)
            entry = ((tag.module, type(mod).__name__ if mod is not None else "Adapter"),)
            fused = tag.fused
            if len(fused) > 1:
                # A node shared by fused sibling sites (q/k/v's one LoRA-A matmul) belongs to all of them:
                # it sits in their innermost common module (the attention block), not in the first site.
                owners = [for_path(site_owner(getattr(_attr(gm, m), "site_name", tag.site))) for m in fused]
                common = 0
                while all(len(o) > common and o[common] == owners[0][common] for o in owners):
                    common += 1
                out[n] = owners[0][:common] + entry
            else:
                out[n] = for_path(site_owner(tag.site)) + entry
        elif rec[n]:
            out[n] = rec[n]
        elif n in site_of:
            out[n] = for_path(site_owner(site_of[n]))
        elif n.op == "get_attr":
            out[n] = for_path(n.target.rpartition(".")[0])
        else:
            out[n] = ()
    # Unrecorded helpers of a site call (the ``W.t()`` of ``x @ W.t()``) sit with the parameter they read.
    for n in nodes:
        if not out[n] and n.op in ("call_function", "call_method"):
            attrs = [a for a in n.all_input_nodes if a.op == "get_attr" and out.get(a)]
            if attrs and all(u in site_of for u in n.users):
                out[n] = out[attrs[0]]
    return out


def _adapter_view(gm: nn.Module, tag) -> dict | None:
    """A node's tag as plain data, with the sites of a fused group (read off the adapter modules)."""
    if tag is None:
        return None
    d = tag_dict(tag)
    d["fused_sites"] = tuple(getattr(_attr(gm, m), "site_name", m) for m in tag.fused)
    return d


def _dim_names(nodes: list[fx.Node], values: dict[fx.Node, Any]) -> dict[str, str]:
    """Name symbolic dims after the inputs they come from: ``{"s72": "input_ids.size(0)"}``."""
    names: dict[str, str] = {}
    for n in nodes:
        v = values.get(n)
        if n.op != "placeholder" or not isinstance(v, torch.Tensor):
            continue
        for i, d in enumerate(v.shape):
            if not isinstance(d, int):
                names.setdefault(str(d), f"{n.name}.size({i})")
    return names


def to_networkx(gm: fx.GraphModule | fx.Graph, *, infer_shapes: bool = True) -> nx.DiGraph:
    """A :class:`networkx.DiGraph` view of ``gm``: one node per FX node, one edge per data dependency.

    Nodes are keyed by the FX node's name (unique in a graph, and kept by fxpeft's passes, which is what lets
    two snapshots of one graph be compared). Each node has these attributes:

    * ``op``: the FX opcode (``placeholder``, ``get_attr``, ``call_function``, ``call_method``, ``call_module``,
      ``output``); ``target``: the FX target as a string; ``opname``: a short name (``linear``, ``add``);
    * ``module`` / ``module_class``: the innermost owning module's path (``""`` for the root) and class;
      ``module_stack``: ``((path, class), ...)`` from the outermost module in (an adapter node's stack ends
      with its adapter module, under the site it adapts);
    * ``adapter``: the fxpeft tag ``{"method", "adapter", "site", "module", "role"}`` of a node a pass
      inserted, else None; ``site``: the site name of a node that applies a site's base weight, else None;
    * ``shape`` (tuple of ints, or strings for symbolic dims) / ``dtype`` (``"f32"``) of the node's value, or
      None where the graph does not know them; ``value``: ``"tensor"``, ``"scalar"``, ``"tuple"`` or None;
    * ``param_shape``: for a ``get_attr`` of a tensor, that tensor's shape; for a ``call_module``, its
      module's ``weight`` shape (if it has one); ``order``: position in the graph.

    Edges ``u -> v`` mean ``v`` reads ``u``'s value. The graph attributes hold ``dialect`` (``"export"`` or
    ``"fx"``), ``name`` and ``dims`` (symbolic dim -> the input dim it stands for).

    Args:
        gm: a graph module (or a bare ``fx.Graph``, which gives no parameter shapes or module classes).
        infer_shapes: give nodes a pass inserted (which carry no recorded value) a shape by running them on
            the graph's fake tensors. Only export graphs carry fake tensors.

    Returns:
        The view. It holds no tensors: later changes to ``gm`` do not show in it.

    Example:
        >>> import torch, networkx as nx, fxpeft
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> gm = fxpeft.rewrite(fxpeft.trace(mlp, (torch.randn(3, 4),)), fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> g = fxpeft.to_networkx(gm)
        >>> len(g) == len(gm.graph.nodes), nx.is_directed_acyclic_graph(g)
        (True, True)
        >>> sorted({d["adapter"]["site"] for _, d in g.nodes(data=True) if d["adapter"]})
        ['0']
        >>> g.nodes["linear"]["site"], g.nodes["linear"]["shape"][-1]   # first dim: symbolic batch
        ('0', 8)
    """
    if isinstance(gm, fx.Graph):
        graph, owner = gm, gm.owning_module
        if owner is None:  # a graph on its own: no parameters or module classes to look up
            owner = nn.Module()
            owner.graph, owner.meta = graph, {}
    else:
        graph, owner = gm.graph, gm
    nodes = list(graph.nodes)
    values = {n: _node_value(n) for n in nodes}
    if infer_shapes:
        _fill_values(owner, values)
    site_of = _site_calls(owner)
    stacks = _stacks(owner, nodes, site_of)

    g = nx.DiGraph(dialect=graph_dialect(owner), name=type(owner).__name__, dims=_dim_names(nodes, values))
    for i, n in enumerate(nodes):
        shape, dtype, kind = _describe_value(values[n])
        param_shape = None
        if n.op == "get_attr":
            t = _attr(owner, n.target)
            if isinstance(t, torch.Tensor):
                param_shape = tuple(t.shape)
        elif n.op == "call_module":  # a module call reads its weight inside: record that weight's shape
            w = getattr(_attr(owner, n.target), "weight", None)
            if isinstance(w, torch.Tensor):
                param_shape = tuple(w.shape)
        stack = stacks[n]
        tag = get_tag(n)
        g.add_node(n.name, op=n.op, target=_target_str(n), opname=_opname(n, owner),
                   module=stack[-1][0] if stack else "", module_class=stack[-1][1] if stack else type(owner).__name__,
                   module_stack=stack, adapter=_adapter_view(owner, tag), site=site_of.get(n),
                   shape=shape, dtype=dtype, value=kind, param_shape=param_shape, order=i)
    for n in nodes:
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g


def sites_sharing_input(gm: fx.GraphModule | nx.DiGraph) -> dict[str, list[str]]:
    """Groups of sites whose calls read one and the same input value (fusion candidates).

    A site's input is the activation its base op reads (not its weight). Only inputs read by two or more
    sites are listed; adapter nodes are not sites.

    Args:
        gm: a graph module, or its :func:`to_networkx` view.

    Returns:
        ``{input node name: [site names, in graph order]}``.

    Example:
        >>> import fxpeft
        >>> from fxpeft.graph import sites_sharing_input
        >>> from fxpeft.zoo import tiny_llama
        >>> ex = tiny_llama(layers=1)
        >>> gm = fxpeft.trace(ex.model, ex.args, ex.kwargs)
        >>> [[s.rsplit(".", 1)[-1] for s in group] for group in sites_sharing_input(gm).values()]
        [['q_proj', 'k_proj', 'v_proj'], ['gate_proj', 'up_proj']]
    """
    g = gm if isinstance(gm, nx.DiGraph) else to_networkx(gm, infer_shapes=False)
    groups: dict[str, list[str]] = {}
    for name in sorted(g, key=lambda k: g.nodes[k]["order"]):
        d = g.nodes[name]
        if not d["site"]:
            continue
        # The activation input: a predecessor that is neither a parameter nor a view of one.
        acts = [p for p in g.predecessors(name)
                if g.nodes[p]["op"] != "get_attr"
                and not (g.nodes[p]["op"] in ("call_function", "call_method")
                         and all(g.nodes[q]["op"] == "get_attr" for q in g.predecessors(p)))]
        for a in acts[:1]:
            if d["site"] not in groups.setdefault(a, []):
                groups[a].append(d["site"])
    return {k: v for k, v in groups.items() if len(v) > 1}
