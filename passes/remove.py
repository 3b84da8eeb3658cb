"""The remove pass: the exact inverse of inject. Afterwards ``gm.code`` and ``gm.state_dict()`` are what they
were before the adapter went in (and, once no adapter is left, so are the base parameters' ``requires_grad``)."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpeft.errors import ConfigError
from fxpeft.inputs import drop_unused_inputs
from fxpeft.registry import AdapterModule, Method
from fxpeft.tags import AdapterTag, Role, get_tag, graph_info, set_graph_info

from .inject import adapter_modules
from .transaction import transaction

__all__ = ["RemoveAdapters", "select_adapters", "base_value", "erase_adapter_nodes", "detach_adapters"]


def select_adapters(gm: fx.GraphModule, names: Iterable[str] | None) -> dict[str, AdapterModule]:
    """The adapter modules of ``names`` (all when None). An unknown name raises, listing the names present."""
    mods = adapter_modules(gm)
    if names is None:
        return mods
    if isinstance(names, str):
        names = [names]
    names = list(names)
    have = sorted({m.adapter_name for m in mods.values()})
    unknown = [n for n in names if n not in have]
    if unknown:
        raise ConfigError(f"the graph holds no adapter named {unknown[0]!r}; it holds {have}")
    return {p: m for p, m in mods.items() if m.adapter_name in names}


def base_value(node: fx.Node) -> fx.Node:
    """The base value an ``OUT`` node stands in for: follow ``args[tag.replaces]`` out of the adapter's nodes."""
    tag = get_tag(node)
    own = tag.module if tag is not None else None
    # Only through this adapter's own nodes: another adapter's OUT node on the same site (stacked adapters) is
    # the value this one stands in for, and must stay in the graph.
    while tag is not None and tag.module == own and tag.replaces is not None:
        node = node.args[tag.replaces]
        tag = get_tag(node)
    if tag is not None and tag.module == own:
        raise ConfigError(f"adapter node {node.name!r} breaks the graph contract (no 'replaces' path to a base "
                          "value); was the graph edited by hand?")
    return node


def erase_adapter_nodes(graph: fx.Graph, paths: Collection[str]) -> None:
    """Reconnect every user of the ``OUT`` nodes of the adapters at ``paths`` to the base value, and erase
    their nodes (the graph only: their modules stay)."""
    paths, doomed = set(paths), []
    for n in graph.nodes:
        tag = get_tag(n)
        if tag is None or not ({tag.module, *tag.fused} & paths):
            continue
        doomed.append(n)
        if tag.role is Role.OUT:
            n.replace_all_uses_with(base_value(n), delete_user_cb=lambda u: not _same(get_tag(u), tag))
    for n in reversed(doomed):
        graph.erase_node(n)


def detach_adapters(gm: fx.GraphModule, mods: dict[str, AdapterModule]) -> None:
    """Reconnect every user of these adapters' ``OUT`` nodes to the base value, erase their nodes, delete their
    modules (and the methods' shared state once no site of that adapter is left)."""
    erase_adapter_nodes(gm.graph, mods.keys())
    drop_unused_inputs(gm)  # a forward keyword only these adapters read (fxpeft.inputs) goes with them
    for path in mods:
        gm.delete_submodule(path)
    left = {(m.method, m.adapter_name) for m in adapter_modules(gm).values()}
    for method, name in {(m.method, m.adapter_name) for m in mods.values()} - left:
        path = Method.shared_path(method, name)
        if hasattr(gm, path):
            gm.delete_submodule(path)


def _same(a: AdapterTag | None, b: AdapterTag) -> bool:
    return a is not None and a.module == b.module


def restore_base_flags(gm: fx.GraphModule) -> None:
    """Once no adapter is left, give base parameters back the ``requires_grad`` they had before fxpeft."""
    info = graph_info(gm)
    if adapter_modules(gm) or info.frozen is None:
        return
    params = dict(gm.named_parameters())
    for name, flag in info.frozen.items():
        if name in params:
            params[name].requires_grad_(flag)
    info.frozen = None
    set_graph_info(gm, info)


@dataclass(frozen=True)
class RemoveAdapters:
    """Delete adapters without merging them: the graph computes the base model again.

    Args:
        adapter_names: remove only these (default: all). An unknown name raises :class:`fxpeft.ConfigError`.

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes import RemoveAdapters
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> code = gm.code
        >>> gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> RemoveAdapters()(gm).modified, gm.code == code, RemoveAdapters()(gm).modified
        (True, True, False)
    """

    adapter_names: tuple[str, ...] | None = None

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        mods = select_adapters(gm, self.adapter_names)
        if not mods:
            gm.graph.lint()
            return PassResult(gm, False)
        with transaction(gm):
            detach_adapters(gm, mods)
            restore_base_flags(gm)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, True)
