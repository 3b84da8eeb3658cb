"""Sibling fusion: low-rank adapter chains that read the same input share one dropout and one down matmul.

q/k/v projections read one normalised hidden state, gate/up read another. Unfused, each site draws its
own dropout of that input and runs its own thin ``x @ A.T``. Fused, the group runs::

    A_cat = cat([A_q, A_k, A_v])          # [r_q + r_k + r_v, in], built in the graph every call
    a     = linear(dropout(x), A_cat)     # one dropout, one matmul: [..., r_q + r_k + r_v]
    a_q, a_k, a_v = split(a, [r_q, r_k, r_v], -1)
    y_q   = y_q + linear(a_q * scale_q, B_q)   # each site keeps its own run-time scale, B and OUT node

The pass is generic: it matches node *roles* (``DOWN_WEIGHT``, ``DROPOUT``, ``DOWN``, ``SCALE``, ``UP``), so
any method whose subgraph has that shape fuses; it never names a method.

Siblings whose down weight is *one value* (the same ops on the same stored tensors: a slice of a frozen matrix
that a method shares across its sites) need no ``cat`` or ``split``: the group runs one
``a = linear(dropout(x), A)`` and every site's scale reads ``a``.

Fusion is a view, not a format: every adapter module keeps its own parameters (the ``cat`` reads them, so
their gradients stay per site), and saved files are unchanged. Fused siblings share one dropout mask (the
first site's module draws it); unfused, PEFT-style, each site draws its own. A site's other readers of its
dropped-out input (DoRA's base term behind a dropout) read the shared one. Expectations and eval-mode
outputs are identical. ``fxpeft.rewrite(..., fuse=False)`` keeps one mask per site.

Shared nodes (``cat``, cast, dropout, the fused matmul, split) are tagged with the first site's module and
carry ``fused`` (the modules of the whole group). :class:`UnfuseLowRankSiblings` restores one chain per site.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpeft.registry import fx_callable, new_node
from fxpeft.tags import AdapterTag, Role, get_tag, graph_info, set_tag

from .transaction import lint, transaction

__all__ = ["FuseLowRankSiblings", "UnfuseLowRankSiblings", "low_rank_chains"]

aten = torch.ops.aten
_LINEAR = {aten.linear.default, fx_callable(aten.linear.default), torch.nn.functional.linear}


@dataclass
class _Chain:
    """One unfused chain on a linear call: ``up(scale(down(dropout(cast(x)), A)), B)``."""

    tag: AdapterTag
    x: fx.Node
    a_attr: fx.Node
    cast: fx.Node | None
    dropout: fx.Node | None
    down: fx.Node
    scale: fx.Node


def _role(node, module: str) -> Role | None:
    tag = get_tag(node) if isinstance(node, fx.Node) else None
    return tag.role if tag is not None and tag.module == module and not tag.fused else None


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _chain(n: fx.Node) -> _Chain | None:
    tag = get_tag(n)
    if (tag is None or tag.role is not Role.DOWN or tag.fused or n.op != "call_function" or n.target not in _LINEAR
            or len(n.args) != 2 or n.kwargs):
        return None
    inp, a_attr = n.args
    if _role(a_attr, tag.module) is not Role.DOWN_WEIGHT or len(a_attr.users) != 1:
        return None
    # the dropped-out input may have other readers in the same adapter (DoRA's base term): they follow it when fused
    dropout = inp if _role(inp, tag.module) is Role.DROPOUT and all(
        u is n or _role(u, tag.module) is not None for u in inp.users) else None
    pre = dropout.args[0] if dropout is not None else inp
    cast = pre if _role(pre, tag.module) is Role.CAST and len(pre.users) == 1 else None
    x = cast.args[0] if cast is not None else pre
    scale = _only_user(n)
    if not isinstance(x, fx.Node) or _role(scale, tag.module) is not Role.SCALE or scale.args[0] is not n:
        return None
    return _Chain(tag, x, a_attr, cast, dropout, n, scale)


def low_rank_chains(gm: fx.GraphModule) -> list[_Chain]:
    """Every unfused low-rank chain on a linear site, in graph order (the fusion candidates)."""
    return [c for n in gm.graph.nodes if (c := _chain(n)) is not None]


def _get(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):  # submodules straight from their table: nn.Module.__getattr__ is slow
        modules = obj.__dict__.get("_modules")
        obj = modules[part] if modules is not None and part in modules else getattr(obj, part)
    return obj


def _value_key(node: fx.Node) -> object:
    """A key equal for two nodes that compute the same value from the same stored tensors (a ``get_attr``, or ops on
    ``get_attr`` reads and scalar constants); anything else (an activation, a module call) is keyed by the node."""
    if node.op == "get_attr":
        return ("get_attr", node.target)
    if node.op == "call_function" and not node.kwargs and not any(isinstance(a, (list, tuple, dict))
                                                                  for a in node.args):  # containers may hold nodes
        return node.target, tuple(_value_key(a) if isinstance(a, fx.Node) else a for a in node.args)
    return node


def _key(gm: fx.GraphModule, c: _Chain) -> tuple:
    drop = None if c.dropout is None else (type(m := _get(gm, c.dropout.target)), getattr(m, "p", None))
    cast = None if c.cast is None else c.cast.kwargs.get("dtype")
    if c.a_attr.op != "get_attr":  # a down weight computed in the graph: siblings fuse when it is the same value
        return c.x, c.tag.adapter, drop, cast, "same", _value_key(c.a_attr)
    a = _get(gm, c.a_attr.target)
    return c.x, c.tag.adapter, drop, cast, a.dtype, a.device, a.dim()


class _Builder:
    """Creates tagged nodes: shared ones carry the lead's tag with ``fused``; per-site ones their own tag."""

    def __init__(self, gm: fx.GraphModule, lead: AdapterTag, fused: tuple[str, ...], stack_from: fx.Node):
        self.graph, self.export = gm.graph, graph_info(gm).dialect == "export"
        stack = stack_from.meta.get("nn_module_stack")
        self.lead, self.fused, self.stack = lead, fused, dict(stack) if stack is not None else None

    def node(self, op: str, target, args, role: Role, own: AdapterTag | None = None, **kwargs) -> fx.Node:
        if op == "call_function" and isinstance(target, torch._ops.OpOverload) and not self.export:
            target = fx_callable(target)
        tag = own.with_role(role) if own is not None else self.lead.with_role(role, fused=self.fused)
        stem = tag.site.replace(".", "_").replace(":", "_")
        node = new_node(self.graph, op, target, tuple(args), kwargs,
                        f"{stem}_{role.value}" if own else f"{stem}_fused_{role.value}")
        if self.stack is not None:  # one copy per fused group, shared by its nodes (read-only metadata)
            node.meta["nn_module_stack"] = self.stack
        return set_tag(node, tag)


def _own_inputs(node: fx.Node, module: str) -> list[fx.Node]:
    """``node`` and the nodes of ``module``'s (unfused) subgraph it reads, each after what it reads."""
    order: list[fx.Node] = []

    def visit(n: fx.Node) -> None:
        if n in order or _role(n, module) is None:
            return
        for a in n.all_input_nodes:
            visit(a)
        order.append(n)

    visit(node)
    return order


def _share_group(gm: fx.GraphModule, group: list[_Chain], pos: dict[fx.Node, int]) -> None:
    """Siblings whose down weight is one value (a slice of a matrix every site shares): one ``x @ A.T``, read by
    every site's scale; no ``cat``/``split``. The lead keeps its weight nodes; the others' go."""
    build = _Builder(gm, group[0].tag, tuple(c.tag.module for c in group), group[0].down)
    first = min((c.cast or c.dropout or c.down for c in group), key=pos.__getitem__)
    lead = group[0]
    for n in _own_inputs(lead.a_attr, lead.tag.module):  # the weight is computed before the first reader of x
        first.prepend(n)
    with gm.graph.inserting_before(first):
        h = lead.x
        if lead.cast is not None:
            h = build.node("call_function", aten._to_copy.default, (h,), Role.CAST, **lead.cast.kwargs)
        if lead.dropout is not None:
            h = build.node("call_module", lead.dropout.target, (h,), Role.DROPOUT)
        a = build.node("call_function", aten.linear.default, (h, lead.a_attr), Role.DOWN)  # [..., r]
    for c in group:
        c.scale.replace_input_with(c.down, a)
        if c.dropout is not None:  # the site's other readers of its dropped-out input read the shared one
            c.dropout.replace_all_uses_with(h)
        weight = [] if c is lead else _own_inputs(c.a_attr, c.tag.module)
        for n in [c.down, c.dropout, c.cast, *reversed(weight)]:
            if n is not None and not n.users:
                gm.graph.erase_node(n)


def _fuse_group(gm: fx.GraphModule, group: list[_Chain], pos: dict[fx.Node, int]) -> None:
    if group[0].a_attr.op != "get_attr":
        _share_group(gm, group, pos)
        return
    build = _Builder(gm, group[0].tag, tuple(c.tag.module for c in group), group[0].down)
    ranks = [_get(gm, c.a_attr.target).shape[0] for c in group]
    # The first node of the group that reads x: x is defined by then, and no site has used its A yet.
    first = min((c.cast or c.dropout or c.down for c in group), key=pos.__getitem__)
    for c in group:  # each site's get_attr of A moves up, keeping its name and tag
        first.prepend(c.a_attr)
    lead = group[0]
    with gm.graph.inserting_before(first):
        a_cat = build.node("call_function", aten.cat.default, ([c.a_attr for c in group], 0), Role.DOWN_CAT)
        h = lead.x
        if lead.cast is not None:
            h = build.node("call_function", aten._to_copy.default, (h,), Role.CAST, **lead.cast.kwargs)
        if lead.dropout is not None:
            h = build.node("call_module", lead.dropout.target, (h,), Role.DROPOUT)
        a = build.node("call_function", aten.linear.default, (h, a_cat), Role.DOWN)  # [..., sum(ranks)]
        split = build.node("call_function", aten.split_with_sizes.default, (a, ranks, -1), Role.DOWN_SPLIT)
        parts = [build.node("call_function", operator.getitem, (split, i), Role.DOWN_PART, own=c.tag)
                 for i, c in enumerate(group)]
    for c, part in zip(group, parts):
        if "nn_module_stack" in c.down.meta:  # a part is its own site's node: its module stack, not the lead's
            part.meta["nn_module_stack"] = dict(c.down.meta["nn_module_stack"])
        c.scale.replace_input_with(c.down, part)
        if c.dropout is not None:  # the site's other readers of its dropped-out input read the shared one
            c.dropout.replace_all_uses_with(h)
        for n in (c.down, c.dropout, c.cast):
            if n is not None:
                gm.graph.erase_node(n)


@dataclass(frozen=True)
class FuseLowRankSiblings:
    """Fuse the down side (cast, dropout, matmul) of low-rank chains that read the same input, per adapter.

    Chains are grouped when they read one input node, hold the same adapter, and have the same dropout
    (module type and ``p``, or none), cast and ``A`` dtype/device. Idempotent: a graph with nothing left to
    fuse is returned with ``modified=False``.

    Args:
        adapter_names: fuse only these adapters' sites (default: all).
        recompile: False when the caller regenerates the code itself (the graph is linted either way).

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes import FuseLowRankSiblings
        >>> from fxpeft.zoo import tiny_llama
        >>> model, args, kwargs = tiny_llama(layers=1)
        >>> gm = fxpeft.rewrite(fxpeft.trace(model, args, kwargs),
        ...                     fxpeft.LoraConfig(r=4, target_modules="all-linear"), fuse=False)
        >>> FuseLowRankSiblings()(gm).modified, FuseLowRankSiblings()(gm).modified
        (True, False)
    """

    adapter_names: tuple[str, ...] | None = None
    recompile: bool = True

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        chains = [c for c in low_rank_chains(gm) if self.adapter_names is None or c.tag.adapter in self.adapter_names]
        by_key: dict[tuple, list[_Chain]] = {}
        for c in chains:
            by_key.setdefault(_key(gm, c), []).append(c)
        groups = [g for g in by_key.values() if len(g) > 1]
        if groups:
            pos = {n: i for i, n in enumerate(gm.graph.nodes)}
            with transaction(gm):
                for group in groups:
                    _fuse_group(gm, group, pos)
                lint(gm)
                if self.recompile:
                    gm.recompile()
        return PassResult(gm, bool(groups))


def _unfuse_group(gm: fx.GraphModule, cat: fx.Node) -> None:
    down = next(u for u in cat.users if get_tag(u).role is Role.DOWN)
    h, shared = down.args[0], [cat, down]
    dropout = h if get_tag(h) is not None and get_tag(h).role is Role.DROPOUT else None
    h = dropout.args[0] if dropout is not None else h
    cast = h if get_tag(h) is not None and get_tag(h).role is Role.CAST else None
    x = cast.args[0] if cast is not None else h
    split = _only_user(down)
    shared += [n for n in (dropout, cast) if n is not None] + [split]
    for i, part in enumerate(sorted(split.users, key=lambda g: g.args[1])):
        tag = get_tag(part)
        build = _Builder(gm, tag, (), part)
        with gm.graph.inserting_before(part):
            h = x
            if cast is not None:
                h = build.node("call_function", aten._to_copy.default, (h,), Role.CAST, own=tag, **cast.kwargs)
            if dropout is not None:
                h = build.node("call_module", f"{tag.module}.dropout", (h,), Role.DROPOUT, own=tag)
                for u in list(dropout.users):  # the site's other readers of the dropped-out input (DoRA's base term)
                    if _role(u, tag.module) is not None:
                        u.replace_input_with(dropout, h)
            a_attr = cat.args[0][i]
            part.prepend(a_attr)
            a = build.node("call_function", aten.linear.default, (h, a_attr), Role.DOWN, own=tag)
        part.replace_all_uses_with(a)
        gm.graph.erase_node(part)
    for n in sorted(shared, key=lambda n: -list(gm.graph.nodes).index(n)):
        gm.graph.erase_node(n)


def _unshare_group(gm: fx.GraphModule, down: fx.Node) -> None:
    """Undo :func:`_share_group`: each site gets its own cast, dropout and ``x @ A.T`` again, and a site other than
    the lead its own copy of the weight nodes (tagged as its own)."""
    h, weight = down.args
    lead = get_tag(down).module
    dropout = h if get_tag(h) is not None and get_tag(h).role is Role.DROPOUT else None
    h = dropout.args[0] if dropout is not None else h
    cast = h if get_tag(h) is not None and get_tag(h).role is Role.CAST else None
    x = cast.args[0] if cast is not None else h
    lead_nodes = _own_inputs(weight, lead)
    for user in list(down.users):
        tag = get_tag(user)
        build = _Builder(gm, tag, (), user)
        with gm.graph.inserting_before(user):
            h = x
            if cast is not None:
                h = build.node("call_function", aten._to_copy.default, (h,), Role.CAST, own=tag, **cast.kwargs)
            if dropout is not None:
                h = build.node("call_module", f"{tag.module}.dropout", (h,), Role.DROPOUT, own=tag)
                for u in list(dropout.users):  # the site's other readers of the dropped-out input
                    if _role(u, tag.module) is not None:
                        u.replace_input_with(dropout, h)
            w = weight if tag.module == lead else _copy_nodes(gm, lead_nodes, get_tag(weight).site, tag)[weight]
            a = build.node("call_function", aten.linear.default, (h, w), Role.DOWN, own=tag)
        user.replace_input_with(down, a)
    for n in (down, dropout, cast):
        if n is not None and not n.users:
            gm.graph.erase_node(n)


def _copy_nodes(gm: fx.GraphModule, nodes: list[fx.Node], site: str, tag: AdapterTag) -> dict[fx.Node, fx.Node]:
    """Copies of ``nodes`` (in order; each reads the copies of the earlier ones) tagged and named as ``tag``'s."""
    old, new = site.replace(".", "_").replace(":", "_"), tag.site.replace(".", "_").replace(":", "_")
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        name = new + n.name[len(old):] if n.name.startswith(old) else f"{new}_{n.name}"
        copy = gm.graph.create_node(n.op, n.target, fx.map_arg(n.args, lambda a: env.get(a, a)),
                                    fx.map_arg(n.kwargs, lambda a: env.get(a, a)), name=name)
        copy.meta = dict(n.meta)
        set_tag(copy, tag.with_role(get_tag(n).role))
        env[n] = copy
    return env


@dataclass(frozen=True)
class UnfuseLowRankSiblings:
    """Undo :class:`FuseLowRankSiblings`: give every site of a fused group its own chain again.

    Each site gets its own cast, dropout (its own module, so its own mask) and down matmul; the result
    computes what :func:`fxpeft.rewrite` with ``fuse=False`` builds. Idempotent.
    """

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        leads = [n for n in gm.graph.nodes if (t := get_tag(n)) is not None and t.fused and t.role is Role.DOWN_CAT]
        shared = [n for n in gm.graph.nodes if (t := get_tag(n)) is not None and t.fused and t.role is Role.DOWN
                  and getattr(get_tag(n.args[1]), "role", None) is not Role.DOWN_CAT]
        if leads or shared:
            with transaction(gm):
                for cat in leads:
                    _unfuse_group(gm, cat)
                for down in shared:
                    _unshare_group(gm, down)
                gm.graph.lint()
                gm.recompile()
        return PassResult(gm, bool(leads or shared))
