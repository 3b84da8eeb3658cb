"""The fold pass: write adapters into their base weights in place (or take them back out), keeping them.

This is PEFT's ``merge_adapter`` / ``unmerge_adapter``: a folded adapter stays in the graph, marked merged, and
its gate is off so the graph does not add it twice. Unfolding subtracts the same fp32 delta. The graph's code
does not change, so neither does a compiled graph.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpeft.copies import FullCopy, fold_copy, unfold_copy
from fxpeft.errors import MergeError
from fxpeft.registry import AdapterModule, PeftRegistry
from fxpeft.sites import SITE_KINDS, find_sites

from .merge import _fits, _own_readers, _readers_index, refuse_foreign_reads
from .remove import select_adapters
from .transaction import transaction

__all__ = ["FoldAdapters"]


@dataclass(frozen=True)
class FoldAdapters:
    """Fold (``undo=False``) or unfold (``undo=True``) adapters into their base weights, keeping them.

    Args:
        adapter_names: the adapters to fold (default: every adapter that is on); to unfold, default: every
            merged adapter. Already-folded (or not folded) adapters are skipped with a warning, as in PEFT.
        undo: unfold instead.
        restore: the fold puts back a state the graph was in (``disable_adapters`` on leaving its block), so the
            check that no other site's adapter reads the weight (:func:`~fxpeft.passes.merge.refuse_foreign_reads`)
            is skipped; an unfold never runs it (it gives those readers back the weight they were built on, or the
            state a fold that passed the check left).

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes import FoldAdapters
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> x = torch.randn(2, 4); y = gm(x)
        >>> FoldAdapters()(gm).modified, torch.allclose(gm(x), y, atol=1e-6), FoldAdapters(undo=True)(gm).modified
        (True, True, True)
    """

    adapter_names: tuple[str, ...] | None = None
    undo: bool = False
    restore: bool = False

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        mods = select_adapters(gm, self.adapter_names)
        if self.adapter_names is None:
            mods = {p: m for p, m in mods.items() if (m.merged if self.undo else m.enabled)}
        todo = {p: m for p, m in mods.items() if m.merged == self.undo}
        skipped = sorted({m.adapter_name for p, m in mods.items() if p not in todo})
        if skipped:
            warnings.warn(f"{'unmerge' if self.undo else 'merge'}: adapter(s) {skipped} are "
                          f"{'not merged' if self.undo else 'already merged'}; nothing to do for them")
        if not todo:
            if not mods and self.undo:
                warnings.warn("unmerge: no adapter is merged; nothing to do")
            return PassResult(gm, False)
        sites = find_sites(gm, SITE_KINDS)
        readers = _readers_index(gm)
        if not (self.undo or self.restore):  # a fold changes what other sites' readers of the weight see
            refuse_foreign_reads(gm, sites, todo)
        # full copies (modules_to_save, trained biases) set the base values a method's fold then adds to:
        # they go in first, and come out last. Folds need not commute (rotations): adapters come out in the
        # reverse of the order they go in (sorted is stable).
        items = list(todo.items())[::-1] if self.undo else list(todo.items())
        todo = dict(sorted(items, key=lambda kv: isinstance(kv[1], FullCopy) == self.undo))
        with torch.no_grad(), transaction(gm) as txn:
            for m in todo.values():
                if isinstance(m, FullCopy):
                    (unfold_copy if self.undo else fold_copy)(gm, m, txn)
                    txn.on_rollback(lambda m=m, was=m.merged: m.set_merged(was))
                    m.set_merged(not self.undo)
                    continue
                site = sites[m.site_name]
                weight = gm.get_parameter(site.weight)
                if any(u not in _own_readers(site) for u in readers.get(id(weight), ())):
                    raise MergeError(f"{site.name!r} shares its weight with another call site (tied weights); folding "
                                     "in place would change the other site too. Use fxpeft.merge, which unties it")
                bias = gm.get_parameter(site.bias) if site.bias else None
                self._apply(m, site, weight, bias, txn)
        return PassResult(gm, True)

    def _apply(self, m: AdapterModule, site, weight, bias, txn) -> None:
        method = PeftRegistry.get(m.method)
        step = method.unfold if self.undo else method.fold
        w, b = step(m, site, weight.detach().float(), None if bias is None else bias.detach().float())
        if not (_fits(w, weight.dtype) and (b is None or _fits(b, weight.dtype))):
            raise MergeError(f"folding {m.adapter_name!r} into {site.weight!r} gives non-finite values; nothing was "
                             "changed")
        if bias is None and b is not None:
            raise MergeError(f"{m.adapter_name!r} adds a bias at {site.name!r}, which has none (lora_bias=True); "
                             "merge_adapter changes no code, so it cannot give the site one. Use fxpeft.merge, "
                             "which does; nothing was changed")
        txn.will_write(weight)
        weight.copy_(w.to(weight.dtype))
        if bias is not None and b is not None:
            txn.will_write(bias)
            bias.copy_(b.to(bias.dtype))
        txn.on_rollback(lambda m=m, was=m.merged: m.set_merged(was))
        m.set_merged(not self.undo)
