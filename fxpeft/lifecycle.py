"""Many adapters in one graph, with HF PEFT's names and semantics, as functions on the graph.

=========================================  ============================================================
fxpeft                                     PEFT
=========================================  ============================================================
``rewrite(gm, cfg, adapter_name="b")``     ``add_adapter``: "b" is added, and (as in PEFT) not made active
``set_adapter(gm, name or [names])``       ``base_model.set_adapter``: only these compute and train
``active_adapters(gm)``                    ``active_adapters``
``with disable_adapters(gm): ...``         ``disable_adapter()``: base outputs, restored on exit
``delete_adapter(gm, name)``               ``delete_adapter``
``merge_adapter(gm)`` / ``unmerge_adapter``  ``merge_adapter`` / ``unmerge_adapter``: folded, but kept
``merge(gm)``                              ``merge_and_unload``
``unload(gm)``                             ``unload``
=========================================  ============================================================

Switching is cheap: each adapter's on/off state is a buffer the graph reads (its ``gate``), so
``set_adapter`` and ``disable_adapters`` regenerate no code, and a compiled graph does not recompile for them.
Stricter than PEFT: an unknown name raises :class:`fxpeft.ConfigError` listing the names present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import fx

from .copies import check_active
from .errors import ConfigError
from .passes import FoldAdapters, MergeAdapters, RemoveAdapters
from .passes.inject import adapter_modules, ordered_names
from .passes.outline import on_flat_graph
from .passes.remove import select_adapters
from .passes.transaction import transaction

__all__ = ["adapter_names", "active_adapters", "set_adapter", "disable_adapters", "delete_adapter", "merge_adapter",
           "unmerge_adapter", "merge", "unload"]


def _names(names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str):
        return (names,)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"adapter names must be a name or a list of names, got {names!r}")
    return tuple(names)


def adapter_names(gm: fx.GraphModule) -> list[str]:
    """Every adapter in ``gm``, in the order they were added.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> fxpeft.adapter_names(fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0"]), "svd-rank6"))
        ['default', 'svd-rank6']
    """
    return ordered_names(adapter_modules(gm).values())


def active_adapters(gm: fx.GraphModule) -> list[str]:
    """The adapters that act on the outputs now: computed by the graph, or merged into the weights.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0"]), "b")  # added, not active
        >>> fxpeft.active_adapters(gm)
        ['default']
    """
    return ordered_names(m for m in adapter_modules(gm).values() if m.enabled)


def set_adapter(gm: fx.GraphModule, adapter_name: str | list[str]) -> None:
    """Make exactly these adapters active: only they compute, and only their parameters train.

    No code is generated: the graph reads each adapter's gate at run time.

    Raises:
        ConfigError: a name ``gm`` does not hold (the message lists those it holds), or two of the adapters save one
            module whole (``modules_to_save``: one at a time, as in PEFT); nothing changes.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0"]), "b")
        >>> fxpeft.set_adapter(gm, "b"); fxpeft.active_adapters(gm)
        ['b']
    """
    names = _names(adapter_name)
    select_adapters(gm, names)  # validates every name first
    check_active(gm, names)  # one module saved whole (modules_to_save) is used by one adapter at a time
    for m in adapter_modules(gm).values():
        on = m.adapter_name in names
        m.set_active(on)
        trained = {id(p) for p in m.trainable_parameters()}
        for p in m.parameters():
            p.requires_grad_(on and id(p) in trained)


@contextlib.contextmanager
def disable_adapters(gm: fx.GraphModule) -> Iterator[None]:
    """Run the base model inside the block (adapters merged into weights are taken out and put back).

    The previous state comes back on exit, also when the block raises.

    Example:
        >>> import torch, fxpeft
        >>> lin = torch.nn.Sequential(torch.nn.Linear(4, 4)); x = torch.randn(2, 4)
        >>> gm = fxpeft.rewrite(fxpeft.trace(lin), fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> with fxpeft.disable_adapters(gm):
        ...     bool((gm(x) == lin(x)).all())
        True
    """
    mods = adapter_modules(gm)
    merged = [n for n in adapter_names(gm) if any(m.merged for m in mods.values() if m.adapter_name == n)]
    if merged:
        _fold(gm, tuple(merged), undo=True)
    saved = {m: m.enabled for m in mods.values()}
    try:
        for m in mods.values():
            m.set_active(False)
        yield
    finally:
        for m, on in saved.items():
            m.set_active(on)
        if merged:
            _fold(gm, tuple(merged), restore=True)


@on_flat_graph  # the sites of an outlined graph are inside its blocks: inlined for the fold
def _fold(gm: fx.GraphModule, names: tuple[str, ...], undo: bool = False, restore: bool = False) -> None:
    FoldAdapters(names, undo=undo, restore=restore)(gm)


@on_flat_graph  # an outlined graph (fxpeft.passes.OutlineBlocks) is inlined for the call
def delete_adapter(gm: fx.GraphModule, adapter_name: str) -> fx.GraphModule:
    """Remove an adapter: its nodes, parameters and tags. Deleting the last one gives back the base ``gm.code``.

    Deleting the active adapter leaves the others as they were (no adapter is switched on in its place), so
    :func:`active_adapters` keeps saying what runs.

    Raises:
        ConfigError: an unknown name, or an adapter that is merged into the weights (unmerge it first, as PEFT asks).
    """
    mods = select_adapters(gm, _names(adapter_name))
    if any(m.merged for m in mods.values()):
        raise ConfigError(f"adapter {adapter_name!r} is merged into the base weights; call "
                          "fxpeft.unmerge_adapter(gm) before deleting it")
    return RemoveAdapters(_names(adapter_name))(gm).graph_module


@on_flat_graph  # an outlined graph (fxpeft.passes.OutlineBlocks) is inlined for the call
def merge_adapter(gm: fx.GraphModule, adapter_names: str | list[str] | None = None) -> fx.GraphModule:
    """Fold the active (or named) adapters into the base weights, keeping them, so that
    :func:`unmerge_adapter` can take them out again. An adapter already merged warns and is skipped."""
    return FoldAdapters(_names(adapter_names))(gm).graph_module


@on_flat_graph  # an outlined graph (fxpeft.passes.OutlineBlocks) is inlined for the call
def unmerge_adapter(gm: fx.GraphModule) -> fx.GraphModule:
    """Take every merged adapter back out of the base weights (fp32 subtraction of the same delta)."""
    return FoldAdapters(undo=True)(gm).graph_module


@on_flat_graph  # an outlined graph (fxpeft.passes.OutlineBlocks) is inlined for the call
def merge(gm: fx.GraphModule, adapter_names: str | list[str] | None = None) -> fx.GraphModule:
    """PEFT's ``merge_and_unload``: fold the active (or named) adapters into the weights and remove every adapter.

    Deltas are computed in fp32 and cast back to each weight's dtype; every merged weight is checked to be
    finite before any is written. A weight tied to another call site gets its own copy (with a warning), so
    merged == unmerged. Adapters already merged with :func:`merge_adapter` stay merged.

    Raises:
        MergeError: a merged weight would be NaN/inf; nothing was changed.
        ConfigError: a name ``gm`` does not hold (the message lists those it holds).

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> x = torch.randn(2, 4); before = gm(x)
        >>> torch.allclose(fxpeft.merge(gm)(x), before, atol=1e-6)
        True
    """
    names = _names(adapter_names)
    mods = select_adapters(gm, names)
    if names is None:
        names = tuple(active_adapters(gm))
    fold = tuple(n for n in names if not all(m.merged for m in mods.values() if m.adapter_name == n))
    every = adapter_modules(gm).values()
    # unmerged adapters left out go anyway: first, so that none of them reads a weight the folds change (which
    # MergeAdapters refuses for adapters that stay)
    others = tuple(sorted({m.adapter_name for m in every if m.adapter_name not in names}
                          - {m.adapter_name for m in every if m.merged}))
    with transaction(gm):  # merged adapters' folds are in the weights already: their graph part just goes
        if fold:
            if others:
                RemoveAdapters(others)(gm)
            MergeAdapters(fold)(gm)
        if not fold or adapter_modules(gm):  # MergeAdapters linted what it left; lint again only for more edits
            RemoveAdapters()(gm)
    return gm


@on_flat_graph  # an outlined graph (fxpeft.passes.OutlineBlocks) is inlined for the call
def unload(gm: fx.GraphModule) -> fx.GraphModule:
    """PEFT's ``unload``: remove every adapter without merging. Merged adapters are first taken out of the
    weights, so the result is the base graph."""
    with transaction(gm):
        if any(m.merged for m in adapter_modules(gm).values()):
            unmerge_adapter(gm)
        RemoveAdapters()(gm)
    return gm
