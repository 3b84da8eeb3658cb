"""A mixed batch: a different adapter on each row of one batch, as PEFT's ``adapter_names=`` forward.

``gm(*args, adapter_names=[...], **kwargs)`` takes one adapter name per batch row (``"__base__"``: no adapter).
It runs the graph's mixed-batch twin (:class:`fxpeft.passes.MixedBatch`): gathered weights and batched matmuls
at each site, at the cost of one adapter per token whatever the number of adapters, and differentiable
(each row trains its own adapter). The twin is built on first use and rebuilt after any fxpeft edit.

For ``torch.compile`` and ``torch.export``, use the twin itself: :func:`mixed_batch` returns it, it takes the
row index as an ``int64`` tensor input named ``adapter_index``, and :func:`adapter_index` builds that tensor.
:func:`export_mixed_batch` writes it to a ``.pt2`` with the index -> name table next to it.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Sequence

import torch
from torch import fx

from .api import export
from .atomic import replace_file
from .errors import ConfigError
from .passes.mixed import BASE, INDEX_INPUT, MixedBatch
from .tags import graph_info

__all__ = ["mixed_batch", "adapter_index", "export_mixed_batch", "BASE"]

#: each graph's twin, with the generation of the graph it was built from
_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mixed_batch(gm: fx.GraphModule) -> fx.GraphModule:
    """The mixed-batch twin of ``gm``: same parameters (shared), one more input, ``adapter_index``.

    Args:
        gm: a graph with unmerged adapters (LoRA has a mixed-batch form).

    Returns:
        A ``GraphModule`` called as ``gm`` is, plus ``adapter_index=`` (``int64 [batch]``); the same object until
        ``gm`` is edited again. Its ``GraphInfo.adapter_table`` names each index value.

    Raises:
        MergeError: an adapter is merged (unmerge it first). UnsupportedSiteError: a method has no mixed form.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
        >>> gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> x, mixed = torch.randn(2, 4), fxpeft.mixed_batch(gm)
        >>> y = mixed(x, adapter_index=fxpeft.adapter_index(gm, ["default", "__base__"]))  # row 1: no adapter
        >>> with fxpeft.disable_adapters(gm):
        ...     base = gm(x)
        >>> torch.allclose(y[0], gm(x)[0]), torch.allclose(y[1], base[1])
        (True, True)
    """
    if graph_info(gm).adapter_table is not None:
        return gm
    generation = graph_info(gm).generation
    cached = _TWINS.get(gm)
    if cached is not None and cached[0] == generation:
        return cached[1]
    twin = MixedBatch()(gm).graph_module
    _TWINS[gm] = (generation, twin)
    return twin


def adapter_index(gm: fx.GraphModule, adapter_names: Sequence[str], device: torch.device | str | None = None
                  ) -> torch.Tensor:
    """The ``adapter_index`` tensor for one adapter name per row (``"__base__"``: the base model).

    Raises:
        ConfigError: an unknown name (the message lists the names present).

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> fxpeft.adapter_index(gm, ["default", "__base__", "default"])
        tensor([1, 0, 1])
    """
    table = graph_info(mixed_batch(gm)).adapter_table
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise ConfigError(f"adapter_names must be a list with one adapter name per batch row, got {adapter_names!r}")
    pos = {name: i for i, name in enumerate(table)}
    unknown = [n for n in adapter_names if n not in pos]
    if unknown:
        raise ConfigError(f"the graph holds no adapter named {unknown[0]!r}; it holds {list(table[1:])} "
                          f"(and {BASE!r} for the base model)")
    return torch.tensor([pos[n] for n in adapter_names], dtype=torch.int64, device=device)


@torch.compiler.disable
def _twin_and_index(gm: fx.GraphModule, args: tuple, kwargs: dict, adapter_names: Sequence[str]):
    # Outside torch.compile: the names become a tensor here, so a compiled caller guards on the tensor's
    # shape, not on the names (another row assignment does not recompile).
    twin = mixed_batch(gm)
    if twin is not gm and twin.training != gm.training:
        twin.train(gm.training)
    device = next((a.device for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)), None)
    return twin, adapter_index(gm, adapter_names, device)


def call_mixed(gm: fx.GraphModule, args: tuple, kwargs: dict, adapter_names: Sequence[str]):
    """``gm(*args, adapter_names=..., **kwargs)``: the twin, in ``gm``'s train/eval mode, on the rows' indices."""
    twin, index = _twin_and_index(gm, args, kwargs, adapter_names)
    return twin(*args, **kwargs, **{INDEX_INPUT: index})


def export_mixed_batch(gm: fx.GraphModule, path: str | os.PathLike, args: tuple = (), kwargs: dict | None = None, *,
                       adapter_names: Sequence[str] | None = None, strict: bool = False
                       ) -> torch.export.ExportedProgram:
    """Export the mixed-batch twin to a ``.pt2`` whose last input is ``adapter_index`` (``int64 [batch]``), and
    write the index -> name table next to it as ``<path>.adapters.json`` (``["__base__", "a", "b", ...]``).

    Args:
        gm: the adapted graph.
        path: the ``.pt2`` file.
        args, kwargs: example inputs (batch and sequence dims stay dynamic, as in :func:`fxpeft.export`).
        adapter_names: example names, one per row (default: every row the first adapter).

    Example:
        >>> import torch, fxpeft, tempfile, os, json
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
        >>> gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> p = os.path.join(tempfile.mkdtemp(), "m.pt2")
        >>> _ = fxpeft.export_mixed_batch(gm, p, (torch.randn(2, 4),))
        >>> json.load(open(p + ".adapters.json"))
        ['__base__', 'default']
        >>> torch.export.load(p).module()(torch.randn(3, 4), adapter_index=torch.tensor([0, 1, 1])).shape
        torch.Size([3, 4])
    """
    twin = mixed_batch(gm)
    table = list(graph_info(twin).adapter_table)
    kwargs = dict(kwargs or {})
    rows = next(a.shape[0] for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor))
    names = list(adapter_names) if adapter_names is not None else [table[min(1, len(table) - 1)]] * rows
    kwargs[INDEX_INPUT] = adapter_index(gm, names)
    ep = export(twin, path, args, kwargs, strict=strict)
    replace_file(f"{os.fspath(path)}.adapters.json", lambda tmp: _write_json(tmp, table))
    return ep


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f)
