"""Sibling fusion: LoRA sites that read the same input share one dropout and one LoRA-A matmul.

q/k/v projections read one normalised hidden state, gate/up read another. Unfused, each site draws its
own dropout of that input and runs its own thin ``x @ A.T``. Fused, the group runs::

    A_cat = cat([A_q, A_k, A_v])          # [r_q + r_k + r_v, in], built in the graph every call
    a     = linear(dropout(x), A_cat)     # one dropout, one matmul
    a     = a * scaling                   # one rank-sized scale (per-site scales stay per site if they differ)
    a_q, a_k, a_v = split(a, [r_q, r_k, r_v], -1)
    y_q   = y_q + linear(a_q, B_q)        # each site keeps its own B and "out" node

Fusion is a view, not a format: every adapter module keeps its own ``A``/``B`` parameters (the ``cat`` reads
them, so their gradients stay per site), and the PEFT-format files are unchanged.

**Dropout semantics.** Fused siblings share one dropout mask (the one the first site's dropout module
draws); unfused, PEFT-style, each site draws its own. Each site still sees a standard dropout of ``x`` with
probability ``p``, so the expectation and the eval-mode outputs are identical; only the masks of sibling
sites are correlated. ``fxpeft.rewrite(..., fuse=False)`` keeps one mask per site.

**Tags.** Every node the pass creates carries ``node.meta["fxpeft"]``. Nodes owned by one site (its ``A``
``get_attr``, its slice of the split) are tagged with that site's module, as before. Shared nodes (``cat``,
dropout, the fused matmul, scale, split) are tagged with the first site's module and carry
``"fused": (module, ...)``, the modules of the whole group; roles are ``lora_A_cat``, ``dropout``,
``lora_A``, ``scale``, ``lora_A_split`` and, per site, ``lora_A_part``. With ``fuse_b=True`` the B side is
fused too: ``lora_B_cat`` (the block-diagonal B), ``lora_B``, ``lora_B_split`` and per site ``lora_B_part``.

Because a group only ever holds one adapter's sites, :class:`fxpeft.passes.MergeAdapters` removes a group's
shared nodes together with its sites, with no special case. :class:`UnfuseLoraSiblings` restores the
one-chain-per-site graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpeft.sites import FXPEFT_META, graph_dialect

__all__ = ["FuseLoraSiblings", "UnfuseLoraSiblings", "lora_chains"]

aten = torch.ops.aten
_LINEAR = (aten.linear.default, F.linear, torch._C._nn.linear)
_OPS = {  # which -> (export dialect, fx dialect)
    "cat": (aten.cat.default, torch.cat),
    "linear": (aten.linear.default, F.linear),
    "mul": (aten.mul.Tensor, torch.mul),
    "split": (aten.split_with_sizes.default, torch.split),
    "block_diag": (aten.block_diag.default, torch.block_diag),
}


@dataclass
class _Chain:
    """One unfused LoRA chain on a linear call: ``out = y + linear(scale(linear(dropout(x), A)), B)``."""

    tag: dict
    x: fx.Node
    a_attr: fx.Node
    b_attr: fx.Node
    dropout: fx.Node | None
    lora_a: fx.Node
    scale: fx.Node | None
    lora_b: fx.Node
    out: fx.Node

    @property
    def scaling(self) -> float:
        return 1.0 if self.scale is None else float(self.scale.args[1])

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for n in (self.a_attr, self.b_attr, self.dropout, self.lora_a, self.scale, self.lora_b, self.out) if n is not None]


def _role(node: fx.Node) -> str | None:
    tag = node.meta.get(FXPEFT_META)
    return None if tag is None else tag.get("role")


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def lora_chains(gm: fx.GraphModule) -> list[_Chain]:
    """Every unfused LoRA chain on a linear site, in graph order (the fusion candidates)."""
    chains = []
    for n in gm.graph.nodes:
        tag = n.meta.get(FXPEFT_META)
        if (tag is None or tag.get("role") != "lora_A" or tag.get("method") != "lora" or "fused" in tag
                or n.op != "call_function" or n.target not in _LINEAR or len(n.args) != 2 or n.kwargs):
            continue
        same = lambda m: m is not None and (m.meta.get(FXPEFT_META) or {}).get("module") == tag["module"]  # noqa: E731
        inp, a_attr = n.args
        if not (isinstance(a_attr, fx.Node) and same(a_attr) and _role(a_attr) == "lora_A_weight"):
            continue
        dropout = inp if same(inp) and _role(inp) == "dropout" else None
        if dropout is not None and (dropout.op != "call_module" or len(dropout.users) != 1):
            continue
        x = dropout.args[0] if dropout is not None else inp
        if not isinstance(x, fx.Node) or len(a_attr.users) != 1:
            continue
        nxt = _only_user(n)
        scale = nxt if same(nxt) and _role(nxt) == "scale" else None
        if scale is not None and not (len(scale.args) == 2 and isinstance(scale.args[1], (int, float))):
            continue
        lora_b = _only_user(scale) if scale is not None else nxt
        if not (same(lora_b) and _role(lora_b) == "lora_B" and lora_b.target in _LINEAR and len(lora_b.args) == 2):
            continue
        b_attr = lora_b.args[1]
        out = _only_user(lora_b)
        if not (same(b_attr) and _role(b_attr) == "lora_B_weight" and len(b_attr.users) == 1
                and same(out) and _role(out) == "out"):
            continue
        chains.append(_Chain(dict(tag), x, a_attr, b_attr, dropout, n, scale, lora_b, out))
    return chains


class _Builder:
    """Creates tagged nodes for one fused group at one insertion point."""

    def __init__(self, gm: fx.GraphModule, export: bool, group: list[_Chain]):
        self.gm, self.graph, self.export = gm, gm.graph, export
        self.lead = {k: group[0].tag[k] for k in ("method", "adapter", "site", "module")}
        self.fused = tuple(c.tag["module"] for c in group)
        self.group = group

    def _tag(self, node: fx.Node, role: str, chain: _Chain | None) -> fx.Node:
        if chain is None:
            node.meta[FXPEFT_META] = dict(self.lead, role=role, fused=self.fused)
        else:
            node.meta[FXPEFT_META] = {k: chain.tag[k] for k in ("method", "adapter", "site", "module")} | {"role": role}
        src = (chain or self.group[0]).lora_a  # inserted nodes sit in their (first) site's module stack
        if "nn_module_stack" in src.meta:
            node.meta["nn_module_stack"] = dict(src.meta["nn_module_stack"])
        return node

    def _name(self, role: str, chain: _Chain | None) -> str:
        site = (chain.tag if chain is not None else self.lead)["site"].replace(".", "_").replace(":", "_")
        return f"{site}_{role}" if chain is not None else f"{site}_fused_{role}"

    def fn(self, which: str, *args, role: str, chain: _Chain | None = None) -> fx.Node:
        target = _OPS[which][0 if self.export else 1]
        return self._tag(self.graph.create_node("call_function", target, args, name=self._name(role, chain)), role, chain)

    def getitem(self, src: fx.Node, i: int, role: str, chain: _Chain) -> fx.Node:
        node = self.graph.create_node("call_function", operator.getitem, (src, i), name=self._name(role, chain))
        return self._tag(node, role, chain)

    def call_module(self, target: str, x: fx.Node, role: str) -> fx.Node:
        return self._tag(self.graph.create_node("call_module", target, (x,), name=self._name(role, None)), role, None)


def _get(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _groups(gm: fx.GraphModule, chains: list[_Chain]) -> list[list[_Chain]]:
    groups: dict[tuple, list[_Chain]] = {}
    for c in chains:
        a = _get(gm, c.a_attr.target)
        p = None if c.dropout is None else (type(m := _get(gm, c.dropout.target)), getattr(m, "p", None))
        groups.setdefault((c.x, c.tag["adapter"], p, a.dtype, a.device, a.dim()), []).append(c)
    return [g for g in groups.values() if len(g) > 1]


def _fuse_group(gm: fx.GraphModule, group: list[_Chain], export: bool, fuse_b: bool, pos: dict[fx.Node, int]) -> None:
    build = _Builder(gm, export, group)
    ranks = [_get(gm, c.a_attr.target).shape[0] for c in group]
    scalings = {c.scaling for c in group}
    fuse_b = fuse_b and len(scalings) == 1
    # The first node of the group that reads x: x is defined by then, and no site has used its A yet.
    first = min((c.dropout or c.lora_a for c in group), key=pos.__getitem__)
    for c in group:  # each site's get_attr of A (of B too, with fuse_b) moves up, keeping its name and tag
        first.prepend(c.a_attr)
        if fuse_b:
            first.prepend(c.b_attr)
    with gm.graph.inserting_before(first):
        a_cat = build.fn("cat", [c.a_attr for c in group], 0, role="lora_A_cat")
        x = group[0].x
        if group[0].dropout is not None:
            x = build.call_module(group[0].dropout.target, x, "dropout")
        a = build.fn("linear", x, a_cat, role="lora_A")
        if len(scalings) == 1 and scalings != {1.0}:
            a = build.fn("mul", a, next(iter(scalings)), role="scale")
        if fuse_b:
            b_attrs = [c.b_attr for c in group]
            b_bd = build.fn("block_diag", *([b_attrs] if export else b_attrs), role="lora_B_cat")
            b = build.fn("linear", a, b_bd, role="lora_B")
            outs = [_get(gm, c.b_attr.target).shape[0] for c in group]
            split = build.fn("split", b, outs, -1, role="lora_B_split")
            parts = [build.getitem(split, i, "lora_B_part", c) for i, c in enumerate(group)]
        else:
            split = build.fn("split", a, ranks, -1, role="lora_A_split")
            parts = [build.getitem(split, i, "lora_A_part", c) for i, c in enumerate(group)]
    for c, part in zip(group, parts):
        if fuse_b:
            c.out.replace_input_with(c.lora_b, part)
            doomed = [c.lora_b, c.scale, c.lora_a, c.dropout]
        elif len(scalings) == 1 or c.scale is None:
            c.lora_b.replace_input_with(c.scale or c.lora_a, part)
            doomed = [c.scale, c.lora_a, c.dropout]
        else:  # per-site scales stay on the per-site slices
            c.scale.replace_input_with(c.lora_a, part)
            doomed = [c.lora_a, c.dropout]
        for n in doomed:
            if n is not None:
                gm.graph.erase_node(n)


@dataclass(frozen=True)
class FuseLoraSiblings:
    """Fuse the LoRA-A side (dropout, matmul, scale) of sites that read the same input, per adapter.

    Sites are grouped when they read one input node, hold the same adapter, and have the same dropout
    (module type and ``p``, or none) and ``A`` dtype/device. Idempotent: a graph with nothing left to fuse
    is returned with ``modified=False``.

    Args:
        fuse_b: also fuse the B side into one matmul on the block-diagonal of the B matrices (only for
            groups whose sites share one scaling). It multiplies by zeros: it pays only where per-op
            overhead dominates; off by default (see the README's Performance section).
        adapter_names: fuse only these adapters' sites (default: all).

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes.fuse import FuseLoraSiblings
        >>> from fxpeft.zoo import tiny_llama
        >>> model, args, kwargs = tiny_llama(layers=1)
        >>> gm = fxpeft.rewrite(fxpeft.trace(model, args, kwargs),
        ...                     fxpeft.LoraConfig(r=4, target_modules="all-linear"), fuse=False)
        >>> FuseLoraSiblings()(gm).modified, FuseLoraSiblings()(gm).modified
        (True, False)
    """

    fuse_b: bool = False
    adapter_names: tuple[str, ...] | None = None

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        chains = [c for c in lora_chains(gm) if self.adapter_names is None or c.tag["adapter"] in self.adapter_names]
        groups = _groups(gm, chains)
        export = graph_dialect(gm) == "export"
        pos = {n: i for i, n in enumerate(gm.graph.nodes)} if groups else {}
        for group in groups:
            _fuse_group(gm, group, export, self.fuse_b, pos)
        gm.graph.lint()
        if groups:
            gm.recompile()
        return PassResult(gm, bool(groups))


@dataclass(frozen=True)
class UnfuseLoraSiblings:
    """Undo :class:`FuseLoraSiblings`: give every site of a fused group its own chain again.

    Each site gets its own dropout (its own module, so its own mask), ``linear(x, A)``, scale and B matmul;
    the result computes what the graph :func:`fxpeft.rewrite` builds with ``fuse=False`` computes. Idempotent.
    """

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        leads = [n for n in gm.graph.nodes if (n.meta.get(FXPEFT_META) or {}).get("fused")
                 and n.meta[FXPEFT_META]["role"] == "lora_A_cat"]
        export = graph_dialect(gm) == "export"
        for cat in leads:
            _unfuse_group(gm, cat, export)
        gm.graph.lint()
        if leads:
            gm.recompile()
        return PassResult(gm, bool(leads))


def _unfuse_group(gm: fx.GraphModule, cat: fx.Node, export: bool) -> None:
    from fxpeft.registry import Emit

    lin = next(u for u in cat.users if _role(u) == "lora_A")
    drop = lin.args[0] if _role(lin.args[0]) == "dropout" else None
    x = drop.args[0] if drop is not None else lin.args[0]
    shared = [cat, lin] + ([drop] if drop is not None else [])
    node = _only_user(lin)
    scaling = 1.0
    if _role(node) == "scale":
        shared.append(node)
        scaling = float(node.args[1])
        node = _only_user(node)
    fuse_b = _role(node) == "lora_B"
    if fuse_b:
        bd = node.args[1]
        shared += [node, bd]
        node = _only_user(node)
    shared.append(node)  # the split
    parts = sorted(node.users, key=lambda g: g.args[1])
    attrs = list(cat.args[0]) + (list(bd.args[0] if export else bd.args) if fuse_b else [])
    dialect = "export" if export else "fx"
    for i, part in enumerate(parts):
        tag = part.meta[FXPEFT_META]
        emit = Emit(gm, dialect, tag["method"], tag["adapter"], tag["site"], tag["module"], anchor=part)
        adapter = gm.get_submodule(tag["module"])
        with gm.graph.inserting_before(part):
            h = x
            if drop is not None and hasattr(adapter, "dropout"):
                h = emit.call_module("dropout", x, "dropout")
            A = emit.get_attr("A", "lora_A_weight")
            a = emit.fn("linear", h, A, role="lora_A")
            if scaling != 1.0:
                a = emit.fn("mul", a, scaling, role="scale")
            if fuse_b:
                B = emit.get_attr("B", "lora_B_weight")
                a = emit.fn("linear", a, B, role="lora_B")
        part.replace_all_uses_with(a)
        gm.graph.erase_node(part)
    doomed = set(shared)
    for n in reversed([n for n in gm.graph.nodes if n in doomed]):
        gm.graph.erase_node(n)
    for n in attrs:
        if not n.users:
            gm.graph.erase_node(n)
