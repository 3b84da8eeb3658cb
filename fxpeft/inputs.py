"""Graph inputs that adapters read beyond the model's own: forward keywords such as a per-row task id.

A method asks for one while inserting its nodes (:meth:`fxpeft.registry.Emit.input`). The graph then takes it
as a keyword after the model's inputs, ``gm(*args, task_ids=...)``, in both dialects: a placeholder with the
default ``None`` in a symbolic_trace graph, a new leaf of the calling convention in an export graph. Its first
use is a check (the method's, or :func:`require_input`), so a missing value is a typed error naming the keyword.

The inputs fxpeft added are listed in the graph's :class:`~fxpeft.tags.GraphInfo` (``inputs``): when the last
adapter reading one is removed, the input goes too (:func:`drop_unused_inputs`), so removing adapters gives back
the graph's exact code. The placeholder and its check belong to no adapter (several adapters read them): they
carry no :class:`~fxpeft.tags.AdapterTag`. The inputs travel with the graph as any placeholder does: pickling,
``copy.deepcopy``, :func:`fxpeft.export` (pass the keyword among the example ``kwargs``) and ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .errors import InputShapeError
from .tags import graph_info, set_graph_info

__all__ = ["add_input", "find_input", "checked_input", "drop_unused_inputs", "require_input"]


def require_input(value: Any, name: str, batch_source: Any = None) -> torch.Tensor:
    """The default check of an added input: present, and a tensor (``batch_source``: the graph's first input)."""
    if not isinstance(value, torch.Tensor):
        raise InputShapeError(f"this graph's adapters read the forward keyword {name}=, got {value!r}; call it as "
                              f"gm(*args, {name}=<tensor>)")
    return value


def find_input(graph: fx.Graph, name: str) -> fx.Node | None:
    """The placeholder named ``name``, or None."""
    return next((n for n in graph.nodes if n.op == "placeholder" and n.target == name), None)


def add_input(graph: fx.Graph, name: str, export: bool) -> fx.Node:
    """Add the keyword input ``name`` (default ``None``) after the graph's other inputs; return its placeholder.

    In an export graph the calling convention is a pytree spec: the new input is a new keyword leaf, and the
    graph gets a new codegen object (the old one is left as it was, so a transaction can put it back).
    """
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder(name) if export else graph.placeholder(name, default_value=None)
    if export:
        from .api import _DefaultsCodeGen  # the export codegen that writes defaults into forward's signature

        info = graph._codegen.pytree_info
        args, kwargs = pytree.tree_unflatten(list(range(info.in_spec.num_leaves)), info.in_spec)
        _, spec = pytree.tree_flatten((args, {**kwargs, name: 0}))  # the new leaf comes last
        info = info._replace(orig_args=[*info.orig_args, name], in_spec=spec)
        defaults = {**getattr(graph._codegen, "defaults", {}), name: None}  # trailing: every later one has one
        graph._codegen = _DefaultsCodeGen(info, defaults)
    return node


def _remove_input(graph: fx.Graph, node: fx.Node, export: bool) -> None:
    """The inverse of :func:`add_input` (``node`` has no users)."""
    name = node.target
    graph.erase_node(node)
    if not export:
        return
    from torch.fx.graph import _PyTreeCodeGen

    from .api import _DefaultsCodeGen

    info = graph._codegen.pytree_info
    args, kwargs = pytree.tree_unflatten(list(range(info.in_spec.num_leaves)), info.in_spec)
    _, spec = pytree.tree_flatten((args, {k: v for k, v in kwargs.items() if k != name}))
    info = info._replace(orig_args=[a for a in info.orig_args if a != name], in_spec=spec)
    defaults = {k: v for k, v in getattr(graph._codegen, "defaults", {}).items() if k != name}
    graph._codegen = _DefaultsCodeGen(info, defaults) if defaults else _PyTreeCodeGen(info)


def checked_input(gm: fx.GraphModule, name: str, export: bool,
                  check: Callable[[Any, str, Any], torch.Tensor] | None = None) -> fx.Node:
    """The checked value of the added input ``name``: the placeholder (added on first use, and recorded in the
    graph's info) followed by one ``check(value, name, batch_source)`` node that every adapter reading it shares.
    ``batch_source`` is the graph's first input, whose dim 0 is the batch (as in a mixed batch), so a per-row
    input can be checked against the batch."""
    check = check or require_input
    graph = gm.graph
    node = find_input(graph, name)
    if node is None:
        info = graph_info(gm)
        node = add_input(graph, name, export)
        set_graph_info(gm, dataclasses.replace(info, inputs=(*info.inputs, name)))
    for user in node.users:
        if user.op == "call_function" and user.target is check:
            return user
    first = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(node):
        return graph.call_function(check, (node, name, first))


def drop_unused_inputs(gm: fx.GraphModule) -> None:
    """Remove the inputs fxpeft added that no node reads any more (a check nobody reads counts as unused)."""
    info = graph_info(gm)
    kept = []
    for name in info.inputs:
        node = find_input(gm.graph, name)
        if node is None:
            continue
        checks = [u for u in node.users if u.op == "call_function" and not u.users]
        if len(checks) != len(node.users):
            kept.append(name)
            continue
        for c in checks:
            gm.graph.erase_node(c)
        _remove_input(gm.graph, node, info.dialect == "export")
    if tuple(kept) != info.inputs:
        set_graph_info(gm, dataclasses.replace(info, inputs=tuple(kept)))
