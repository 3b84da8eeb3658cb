"""Outlining: each repeated block of a flat graph becomes one ``call_module`` to a graph submodule of its own.

A graph from ``torch.export`` is flat: the decoder layers are not called as modules, their nodes sit side by side
in one graph. :class:`OutlineBlocks` groups the nodes by the *repeated numbered siblings* of their
``node.meta["nn_module_stack"]`` (``model.layers.0``, ``model.layers.1``, ...; found generically, no architecture
is named) and replaces each block's nodes with one call::

    model_layers_0 = self.model.layers[0](hidden, cos, sin, mask)   # a GraphModule at "model.layers.0"

The new :class:`OutlinedBlock` is placed at the block's own path, so ``gm.get_submodule("model.layers.0")`` is the
layer, and it *takes over* (moves, never copies) every submodule, parameter and buffer the path held: the layer's
base weights and the adapters inserted in it. State-dict keys are unchanged. Its inputs are the values that flow in
(activations, rotary tables, symbolic sizes, weights read from outside the block), its outputs the values used
after it (a tuple when there are several).

Uses: ``torch.distributed.fsdp.fully_shard`` needs a module with a forward per layer (:func:`fxpeft.shard`), and
``gm.code`` shrinks to one line per layer. :class:`InlineBlocks` undoes it (the same nodes, tags and module tree).
The public edits and file operations that walk the nodes (``rewrite``, ``merge``, ``save_adapter``, ...) are
wrapped in :func:`on_flat_graph`: on an outlined graph they inline, run and outline again; on a sharded one they
raise :class:`fxpeft.ConfigError`.
"""

from __future__ import annotations

import functools
import operator
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpeft.errors import ConfigError
from fxpeft.serialize import FxPeftGraphModule

from .transaction import transaction

__all__ = [
    "InlineBlocks",
    "OutlineBlocks",
    "OutlinedBlock",
    "is_sharded",
    "on_flat_graph",
    "outlined_blocks",
    "repeated_blocks",
]

_NUMBERED = re.compile(r"^(.+)\.(\d+)$")
#: ``OutlinedBlock.meta`` key of its :class:`BlockRecord`.
BLOCK_KEY = "fxpeft_block"


@dataclass(frozen=True)
class BlockRecord:
    """What :class:`InlineBlocks` needs to put a block back: its path and the class of the container it replaced."""

    path: str
    container: type


class OutlinedBlock(FxPeftGraphModule):
    """One outlined block: a graph module at the block's path, owning the block's submodules and parameters.

    It pickles and deep-copies with its graph (node tags included), like the graph that holds it.
    """


def outlined_blocks(gm: torch.nn.Module) -> dict[str, OutlinedBlock]:
    """Every outlined block of ``gm`` by path (found by type)."""
    return {p: m for p, m in gm.named_modules() if isinstance(m, OutlinedBlock)}


def is_sharded(block: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``block``."""
    # fully_shard swaps the module's class for a subclass of FSDPModule; found by type, without importing FSDP
    return any(c.__name__ == "FSDPModule" and c.__module__.startswith("torch.distributed") for c in type(block).__mro__)


F = TypeVar("F", bound=Callable[..., Any])


def on_flat_graph(fn: F) -> F:
    """Run ``fn(gm, ...)`` (an edit or file operation that walks the graph's nodes) on an outlined ``gm`` too: the
    blocks are inlined, ``fn`` runs, and they are outlined again, all in one transaction. A graph with no outlined
    block costs one walk over its modules. A sharded graph (``fully_shard``) is refused: its parameters are shards.
    """
    @functools.wraps(fn)
    def wrapper(gm, *args, **kwargs):
        blocks = outlined_blocks(gm) if isinstance(gm, torch.nn.Module) else {}
        if not blocks:
            return fn(gm, *args, **kwargs)
        if is_sharded(gm) or any(is_sharded(b) for b in blocks.values()):
            raise ConfigError(f"{fn.__name__} walks the graph, and this graph is sharded with fully_shard: its blocks "
                              f"hold parameter shards. Call {fn.__name__} before fxpeft.shard (on the unsharded graph), "
                              "or save/load adapters of a sharded run with torch.distributed.checkpoint")
        with transaction(gm):
            InlineBlocks(recompile=False)(gm)
            out = fn(gm, *args, **kwargs)
            OutlineBlocks()(gm)
        return out

    return wrapper  # type: ignore[return-value]


def _stack_paths(node: fx.Node) -> list[str]:
    """The module paths of the node's ``nn_module_stack``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]


def _resolves(gm: torch.nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


def repeated_blocks(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """The nodes of each repeated block of ``gm``'s graph, by block path, in graph order.

    A block is a module path ``<prefix>.<k>`` with at least one numbered sibling ``<prefix>.<j>`` in the stacks of
    the graph's nodes; a node belongs to the outermost block on its stack. ``get_attr`` nodes (no stack in an export
    graph) are not included here; outlining adds those read only by the block.
    """
    index: dict[str, set[str]] = {}
    for n in gm.graph.nodes:
        for path in _stack_paths(n):
            if (m := _NUMBERED.match(path)) is not None:
                index.setdefault(m[1], set()).add(m[2])
    blocks: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr") or (
                n.op == "call_module" and isinstance(gm.get_submodule(n.target), OutlinedBlock)):
            continue
        for path in _stack_paths(n):
            m = _NUMBERED.match(path)
            if m is not None and len(index[m[1]]) > 1:
                blocks.setdefault(path, []).append(n)
                break
    return {p: ns for p, ns in blocks.items() if _resolves(gm, p)}


def _relative(target: str, path: str) -> str | None:
    return target[len(path) + 1:] if target.startswith(path + ".") else None


def _members(gm: fx.GraphModule, path: str, nodes: list[fx.Node]) -> list[fx.Node] | None:
    """The block's nodes plus the ``get_attr`` reads of its own state used only inside it, in graph order; None
    when a module call of the block targets a module outside its path (it cannot move into the block)."""
    inside = set(nodes)
    if any(n.op == "call_module" and _relative(n.target, path) is None for n in nodes):
        return None
    for n in nodes:
        for a in n.all_input_nodes:
            if (a.op == "get_attr" and a not in inside and _relative(a.target, path) is not None
                    and all(u in inside for u in a.users)):
                inside.add(a)
    return [n for n in gm.graph.nodes if n in inside]


def _order_span(members: list[fx.Node]) -> bool:
    """Move the outside nodes that lie between the block's nodes and feed it to before the block, so the block can
    become one call. False when an outside node both reads the block and feeds it (the block is not convex)."""
    inside = set(members)
    anchor = next((m for m in members if m.op != "get_attr"), members[0])
    for m in members[:members.index(anchor)]:  # the block's weight reads (no inputs) move down to its first op
        anchor.prepend(m)
    span = []
    n = members[0]
    while n is not members[-1]:
        span.append(n)
        n = n.next
    span.append(members[-1])
    reads = set()  # outside nodes depending on the block
    for n in span:
        if n not in inside and any(a in inside or a in reads for a in n.all_input_nodes):
            reads.add(n)
    feeds = set()  # outside nodes the block depends on
    for n in reversed(span):
        if n not in inside and any(u in inside or u in feeds for u in n.users):
            feeds.add(n)
    if reads & feeds:
        return False
    for n in span:
        if n in feeds:
            members[0].prepend(n)
    return True


def _subgraph(path: str, members: list[fx.Node]) -> tuple[fx.Graph, list[fx.Node], list[fx.Node]]:
    """The block's own graph; the outside values it reads (its inputs) and its values read after it (outputs)."""
    inside = set(members)
    inputs = list(dict.fromkeys(a for n in members for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for x in inputs:
        ph = sub.placeholder(x.name)
        ph.meta.update({k: x.meta[k] for k in ("val", "tensor_meta") if k in x.meta})
        env[x] = ph
    for n in members:
        new = sub.node_copy(n, env.__getitem__)
        if n.op in ("get_attr", "call_module"):  # the block's own state, named from the block
            new.target = _relative(n.target, path)
        env[n] = new
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    return sub, inputs, outputs


def _move_tables(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Give ``dst`` every submodule, parameter and buffer of ``src`` (the same objects), and empty ``src``."""
    for table in ("_modules", "_parameters", "_buffers"):
        getattr(dst, table).clear()
        getattr(dst, table).update(getattr(src, table))
        getattr(src, table).clear()
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    dst.training = src.training


def _outline(gm: fx.GraphModule, path: str, members: list[fx.Node]) -> None:
    graph = gm.graph
    sub, inputs, outputs = _subgraph(path, members)
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path)
    container = getattr(parent, leaf)
    block = OutlinedBlock(container, sub, class_name="OutlinedBlock")
    _move_tables(container, block)
    block.meta[BLOCK_KEY] = BlockRecord(path, type(container))
    setattr(parent, leaf, block)  # the block takes the container's place in the tree
    inside = set(members)
    stack = members[0].meta.get("nn_module_stack") or {}
    with graph.inserting_before(members[0]):
        call = graph.call_module(path, tuple(inputs))
        keep = list(stack.items())[:[v[0] for v in stack.values()].index(path) + 1] if path in _stack_paths(
            members[0]) else []
        if keep:
            call.meta["nn_module_stack"] = dict(keep)
        outs = [call] if len(outputs) == 1 else [graph.call_function(operator.getitem, (call, i))
                                                 for i in range(len(outputs))]
    for old, new in zip(outputs, outs):
        if "val" in old.meta:
            new.meta["val"] = old.meta["val"]
        old.replace_all_uses_with(new, delete_user_cb=lambda u: u not in inside)
    for n in reversed(members):
        graph.erase_node(n)


@dataclass(frozen=True)
class OutlineBlocks:
    """Outline every repeated block (``model.layers.<k>``, ``transformer.h.<k>``, ...) into a ``call_module``.

    Idempotent: a graph with nothing left to outline comes back with ``modified=False``. A block that cannot be one
    call (an outside node both reads it and feeds it) stays flat, with a warning. Atomic: on failure the graph and
    module tree are as they were.

    Args:
        recompile: False when the caller regenerates the code itself (the graph is linted either way).

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes import OutlineBlocks
        >>> from fxpeft.zoo import tiny_llama
        >>> model, args, kwargs = tiny_llama(layers=2)
        >>> gm = fxpeft.rewrite(fxpeft.trace(model, args, kwargs), fxpeft.LoraConfig(r=4, target_modules=["q_proj"]))
        >>> before = gm(**kwargs).logits
        >>> OutlineBlocks()(gm).modified, OutlineBlocks()(gm).modified
        (True, False)
        >>> type(gm.get_submodule("model.layers.1")).__name__, bool((gm(**kwargs).logits == before).all())
        ('OutlinedBlock', True)
        >>> InlineBlocks()(gm).modified, type(gm.get_submodule("model.layers.1")).__name__
        (True, 'Module')
    """

    recompile: bool = True

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        blocks = repeated_blocks(gm)
        if not blocks:
            return PassResult(gm, False)
        skipped = []
        with transaction(gm):
            for path, nodes in blocks.items():
                members = _members(gm, path, nodes)
                if members is None or not _order_span(members):
                    skipped.append(path)
                    continue
                _outline(gm, path, members)
            gm.graph.lint()
            if self.recompile:
                gm.recompile()
        if skipped:
            warnings.warn(f"OutlineBlocks left {len(skipped)} block(s) flat ({skipped[:3]}): their nodes are "
                          "interleaved with nodes that both read and feed them, or they call modules outside their path")
        return PassResult(gm, len(skipped) < len(blocks))


def _inline(gm: fx.GraphModule, call: fx.Node) -> None:
    graph = gm.graph
    block: OutlinedBlock = gm.get_submodule(call.target)
    path = call.target
    env = dict(zip((n for n in block.graph.nodes if n.op == "placeholder"), call.args))
    result = None
    with graph.inserting_before(call):
        for n in block.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = fx.map_arg(n.args[0], env.__getitem__)
                continue
            new = graph.node_copy(n, env.__getitem__)
            if n.op in ("get_attr", "call_module"):
                new.target = f"{path}.{n.target}"
            env[n] = new
    if isinstance(result, (tuple, list)):  # several outputs: the call's readers are getitems on it
        for user in list(call.users):
            user.replace_all_uses_with(result[user.args[1]])
            graph.erase_node(user)
    else:
        call.replace_all_uses_with(result)
    graph.erase_node(call)
    parent_path, _, leaf = path.rpartition(".")
    record = block.meta.get(BLOCK_KEY)
    cls = record.container if isinstance(record, BlockRecord) else torch.nn.Module
    container = cls.__new__(cls)  # an empty container of the original class: its state comes from the block
    torch.nn.Module.__init__(container)
    _move_tables(block, container)
    setattr(gm.get_submodule(parent_path), leaf, container)


@dataclass(frozen=True)
class InlineBlocks:
    """Undo :class:`OutlineBlocks`: put each outlined block's nodes back into the graph and its state back into a
    plain container at its path. Idempotent. Not for a sharded graph (``fully_shard`` changed the blocks).
    Example: see :class:`OutlineBlocks`.

    Args:
        recompile: False when the caller regenerates the code itself (the graph is linted either way).
    """

    recompile: bool = True

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        calls = [n for n in gm.graph.nodes
                 if n.op == "call_module" and isinstance(gm.get_submodule(n.target), OutlinedBlock)]
        if not calls:
            return PassResult(gm, False)
        if any(is_sharded(gm.get_submodule(c.target)) for c in calls):
            raise ConfigError("InlineBlocks: the blocks of this graph are sharded with fully_shard (their parameters "
                              "are shards); inline before sharding")
        with transaction(gm):
            for call in calls:
                _inline(gm, call)
            gm.graph.lint()
            if self.recompile:
                gm.recompile()
        return PassResult(gm, True)
