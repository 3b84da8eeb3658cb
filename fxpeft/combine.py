"""Weighted combinations of adapters: HF PEFT's ``LoraModel.add_weighted_adapter``, as a function on the graph.

:func:`add_weighted_adapter` validates every argument, asks the adapters' method for the new adapter's config and
tensors (:meth:`fxpeft.Method.combine`), then creates the adapter with the machinery :func:`fxpeft.rewrite` uses
and fills it, in one transaction. This module holds only what is generic: the argument checks and the tensor
maths of PEFT's ``peft.utils.merge_utils`` (task arithmetic, magnitude and random pruning, TIES' sign election
and disjoint merge) and of its SVD truncation, written for any list of same-shaped tensors.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from .copies import FullCopy
from .errors import ConfigError
from .io import _exact_regex
from .passes.inject import adapter_modules, check_adapter_name
from .passes.transaction import transaction
from .pipeline import rewrite_graph
from .registry import AdapterModule, PeftRegistry
from .sites import SITE_KINDS, find_sites

__all__ = ["add_weighted_adapter", "Combination", "COMBINATION_TYPES", "prune_by_magnitude", "prune_at_random",
           "majority_sign_mask", "disjoint_merge", "merge_task_tensors"]

COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
_SIGN_METHODS = ("total", "frequency")
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


# ------------------------------------------------------------------------------------------ tensor maths


def prune_by_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (``density >= 1``: all)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * keep.view(t.shape)


def prune_at_random(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by it, so the expectation of
    every entry is unchanged. Draws from torch's global generator (``torch.manual_seed`` reproduces it); with
    ``density >= 1`` nothing is drawn."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES' sign election over dim 0: where each entry agrees with the elected sign (``"total"``: the sign of
    the sum; ``"frequency"``: the sign most entries have; ties elect +). Zero entries never agree."""
    sign = stacked.sign()
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(votes >= 0, 1, -1)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TIES' merge: the mean over dim 0 of the entries that agree with the elected sign (0 where none does)."""
    return (weighted * mask).sum(0) / mask.sum(0).clamp(min=1.0)


def merge_task_tensors(tensors: Sequence[torch.Tensor], weights: torch.Tensor, rule: str, density: float | None = None,
                       majority_sign_method: str = "total") -> torch.Tensor:
    """Merge same-shaped tensors with per-tensor ``weights`` by one of PEFT's rules.

    ``linear`` is the weighted sum (task arithmetic); ``magnitude_prune`` and ``dare_linear`` prune each tensor
    first (by magnitude; at random, rescaled); ``ties`` and ``dare_ties`` prune likewise, elect a sign per entry
    on the *unweighted* pruned tensors, and average the weighted entries that agree with it.

    Example:
        >>> import torch
        >>> from fxpeft.combine import merge_task_tensors
        >>> merge_task_tensors([torch.tensor([1., -2.]), torch.tensor([3., 4.])], torch.tensor([1., .5]), "linear")
        tensor([2.5000, 0.0000])
    """
    if rule in ("magnitude_prune", "ties"):
        tensors = [prune_by_magnitude(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [prune_at_random(t, density) for t in tensors]
    stacked = torch.stack(list(tensors), 0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if rule in ("ties", "dare_ties"):
        return disjoint_merge(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(0)


@dataclasses.dataclass(frozen=True)
class Combination:
    """A validated :func:`add_weighted_adapter` request, as a method's :meth:`~fxpeft.Method.combine` sees it.

    Attributes:
        combination_type: one of :data:`COMBINATION_TYPES` (``linear`` when a single adapter is combined).
        svd_rank, svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method: as PEFT's arguments.
    """

    combination_type: str
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    density: float | None = None
    majority_sign_method: str = "total"

    @property
    def svd(self) -> bool:
        """Whether the type combines full deltas and truncates them with an SVD (``svd``, ``*_svd``)."""
        return self.combination_type.endswith("svd")

    @property
    def rule(self) -> str | None:
        """The merge rule applied to the tensors (``svd`` merges linearly); None for ``cat``."""
        if self.combination_type == "cat":
            return None
        return "linear" if self.combination_type == "svd" else self.combination_type.removesuffix("_svd")

    def merge(self, tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        """:func:`merge_task_tensors` under this combination's rule and options (weights as fp32, as PEFT)."""
        w = torch.tensor(list(weights), dtype=torch.float32, device=tensors[0].device)
        return merge_task_tensors(tensors, w, self.rule, self.density, self.majority_sign_method)

    def low_rank(self, delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncate a 2-D ``delta [out, in]`` to ``up [out, rank] @ down [rank, in]`` by SVD (``U·S`` and ``Vh``),
        then clamp both to ``±quantile(their entries, svd_clamp)``, as PEFT (after kohya's svd_merge_lora).

        Where the delta has fewer than ``rank`` singular values, the missing columns/rows are zeros (PEFT fails
        there: its factors come out with mismatched ranks).
        """
        U, S, Vh = torch.linalg.svd(delta, full_matrices=self.svd_full_matrices, driver=self.svd_driver)
        k = min(rank, S.numel())
        up, down = U[:, :k] * S[:k], Vh[:k, :]
        if self.svd_clamp is not None:
            hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), self.svd_clamp)
            up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
        if k < rank:
            up = torch.cat([up, up.new_zeros(up.shape[0], rank - k)], 1)
            down = torch.cat([down, down.new_zeros(rank - k, down.shape[1])], 0)
        return up, down


# ------------------------------------------------------------------------------------------ the public call


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_options(combination_type: Any, svd_rank: Any, svd_clamp: Any, svd_driver: Any, density: Any,
                   majority_sign_method: Any) -> None:
    """Every option's type and range, for the type that runs (typed errors naming the argument)."""
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"combination_type={combination_type!r} is not one of {list(COMBINATION_TYPES)}")
    if svd_rank is not None and not (isinstance(svd_rank, int) and not isinstance(svd_rank, bool) and svd_rank > 0):
        raise ConfigError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    if svd_clamp is not None and not (_number(svd_clamp) and 0 <= svd_clamp <= 1):
        raise ConfigError(f"svd_clamp is a quantile: a number in [0, 1] or None, got {svd_clamp!r}")
    if svd_driver not in _SVD_DRIVERS:
        raise ConfigError(f"svd_driver must be one of {list(_SVD_DRIVERS)}, got {svd_driver!r}")
    if majority_sign_method not in _SIGN_METHODS:
        raise ConfigError(f"majority_sign_method must be one of {list(_SIGN_METHODS)}, got {majority_sign_method!r}")
    if combination_type.startswith(("ties", "dare", "magnitude_prune")):
        dare = combination_type.startswith("dare")
        if density is None:
            raise ConfigError(f"combination_type={combination_type!r} prunes: pass density= (the fraction of entries "
                              "kept, e.g. density=0.5)")
        if not (_number(density) and (0 < density <= 1 if dare else 0 <= density <= 1)):
            # DARE divides by the density: 0 would give NaN (it does in PEFT)
            raise ConfigError(f"density must be a number in {'(0, 1]' if dare else '[0, 1]'}, got {density!r}")


def _sources(gm: fx.GraphModule, adapters: Any, weights: Any) -> list[dict[str, AdapterModule]]:
    """Each named adapter's modules by site (checked: known names, one weight each, one method)."""
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters \
            or not all(isinstance(a, str) for a in adapters):
        raise ConfigError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    if not isinstance(weights, (list, tuple)) or not all(_number(w) for w in weights):
        raise ConfigError(f"weights must be a list of finite numbers, one per adapter, got {weights!r}")
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(adapters)} adapters but {len(weights)} weights; pass one weight per adapter")
    mods = adapter_modules(gm)
    have = list(dict.fromkeys(m.adapter_name for m in mods.values()))
    unknown = [a for a in adapters if a not in have]
    if unknown:
        raise ConfigError(f"the graph holds no adapter named {unknown[0]!r}; it holds {have}")
    copied = sorted({m.adapter_name for m in mods.values() if isinstance(m, FullCopy) and m.adapter_name in adapters})
    if copied:
        raise ConfigError(f"adapters {copied} train full copies (modules_to_save or biases); add_weighted_adapter "
                          "combines low-rank updates only. Combine adapters without them")
    sources = [{m.site_name: m for m in mods.values() if m.adapter_name == a} for a in adapters]
    methods = {m.method for src in sources for m in src.values()}
    if len(methods) > 1:
        raise ConfigError(f"adapters {list(adapters)} mix methods {sorted(methods)}; only adapters of one method "
                          "can be combined")
    return sources


def add_weighted_adapter(gm: fx.GraphModule, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """Add ``adapter_name``, a weighted combination of ``adapters`` (PEFT's ``add_weighted_adapter``).

    The new adapter adapts every site any of ``adapters`` adapts. As in PEFT it is added, not made active
    (``fxpeft.set_adapter(gm, adapter_name)`` switches to it), its parameters are frozen, and it saves with
    :func:`fxpeft.save_adapter` like any other adapter. Each ``combination_type`` follows PEFT's formula, including
    its approximations; for LoRA (see :meth:`fxpeft.methods.lora.Lora.combine`):

    * ``cat``: exact; the factors are stacked (rank = sum of the ranks, A scaled by weight × scaling);
    * ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the A's and the B's are merged
      *separately* (weights ``±sqrt(|weight × scaling|)`` on A, ``sqrt(|...|)`` on B): a rough approximation of the
      weighted sum of deltas; the adapters at a site must share a rank;
    * ``svd`` and the ``*_svd`` types: the full deltas (with their scalings) are merged, then truncated to
      ``svd_rank`` (default: the largest rank) by SVD, optionally clamped at the ``svd_clamp`` quantile;
    * ``ties*`` / ``magnitude_prune*`` keep the ``density`` fraction of largest entries, ``dare*`` keep each entry
      with probability ``density`` and rescale by ``1 / density`` (random: seed with ``torch.manual_seed``).

    The new adapter's scaling is 1 (``r = lora_alpha = `` the new rank), as PEFT sets it.

    Where fxpeft deliberately differs from PEFT 0.21.2:

    * **rsLoRA**: PEFT copies ``use_rslora`` from the first adapter into the new one, whose scaling then becomes
      ``sqrt(r)`` instead of 1: the result is ``sqrt(r)`` times too large whenever an rsLoRA adapter comes first.
      fxpeft's new adapter never uses rsLoRA scaling, so the result is the combination computed, in any order.
    * **An existing ``adapter_name``**: PEFT silently does nothing; fxpeft raises :class:`fxpeft.ConfigError`.
    * **One adapter**: PEFT silently switches ``combination_type`` to ``linear``; fxpeft does too, with a warning.
    * **Checks**: unknown names, a weights list of another length (PEFT zips and drops the rest), an unknown
      ``combination_type``/``majority_sign_method``, a missing or out-of-range ``density`` raise ``ConfigError``
      before anything changes; the call is atomic.
    * Sites are those the adapters adapt (PEFT takes the union of their ``target_modules``, refusing to mix a
      list with a regex); ranks must agree per site, not per config; conv1d/conv3d work with the ``*svd`` types.

    Args:
        gm: a graph holding the adapters.
        adapters: names of the adapters to combine (one method's).
        weights: one weight per adapter; negative weights subtract.
        adapter_name: the new adapter's name (must be new).
        combination_type: one of :data:`COMBINATION_TYPES`.
        svd_rank: rank of the result for the ``*svd`` types (default: the largest rank of ``adapters``).
        svd_clamp: quantile in [0, 1] at which the SVD factors are clamped (None: no clamping).
        svd_full_matrices: passed to ``torch.linalg.svd``.
        svd_driver: passed to ``torch.linalg.svd`` (CUDA only).
        density: fraction of entries kept, for the pruning types.
        majority_sign_method: ``"total"`` or ``"frequency"``, for the ``ties`` types.

    Raises:
        ConfigError: a bad argument, an unknown or existing name, a method without weighted merges (IA3), or
            ranks that ``combination_type`` cannot combine; ``gm`` is unchanged.

    Example:
        >>> import torch, fxpeft
        >>> lin = torch.nn.Sequential(torch.nn.Linear(8, 8)); x = torch.randn(2, 8)
        >>> gm = fxpeft.trace(lin)
        >>> for name in ("a", "b"):
        ...     gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), name)
        >>> fxpeft.add_weighted_adapter(gm, ["a", "b"], [0.5, 0.5], "ab", combination_type="cat")
        >>> fxpeft.active_adapters(gm), fxpeft.adapters(gm)["0.lora_ab"].r
        (['a'], 4)
        >>> fxpeft.set_adapter(gm, "ab"); mixed = gm(x)
        >>> fxpeft.set_adapter(gm, ["a", "b"])   # cat is exact: half of each
        >>> torch.allclose(mixed - lin(x), (gm(x) - lin(x)) / 2, atol=1e-6)
        True
    """
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"combination_type={combination_type!r} is not one of {list(COMBINATION_TYPES)}")
    sources = _sources(gm, adapters, weights)
    check_adapter_name(adapter_name)
    names = {m.adapter_name for m in adapter_modules(gm).values()}
    if adapter_name in names:
        raise ConfigError(f"the graph already holds an adapter named {adapter_name!r}; pass another adapter_name, or "
                          f"fxpeft.delete_adapter(gm, {adapter_name!r}) first")
    # The options are checked for the type that runs: one adapter is combined linearly (as PEFT), so it needs
    # no density even where the type asked for would.
    one = len(adapters) == 1 and combination_type != "linear"
    _check_options("linear" if one else combination_type, svd_rank, svd_clamp, svd_driver, density,
                   majority_sign_method)
    if one:
        warnings.warn(f"add_weighted_adapter: one adapter can only be combined linearly; combination_type="
                      f"{combination_type!r} becomes 'linear' (as in PEFT)")
        combination_type = "linear"
    if svd_driver is not None and any(p.device.type != "cuda" for s in sources for m in s.values()
                                      for p in m.parameters()):
        raise ConfigError(f"svd_driver={svd_driver!r} works only on CUDA (cuSOLVER); leave it None on this device")
    combination = Combination(combination_type, svd_rank, svd_clamp, bool(svd_full_matrices), svd_driver,
                              density, majority_sign_method)
    method = PeftRegistry.get(next(iter(sources[0].values())).method)
    all_sites = find_sites(gm, SITE_KINDS)
    used = {n for src in sources for n in src}
    if used - all_sites.keys():
        raise ConfigError(f"adapter sites {sorted(used - all_sites.keys())[:3]} are no longer call sites of this "
                          "graph; was it edited by hand?")
    sites = {n: s for n, s in all_sites.items() if n in used}  # the graph's order (PEFT's: module order)
    config, tensors = method.combine(sources, [float(w) for w in weights], combination, sites)  # changes nothing
    config = dataclasses.replace(config, target_modules=_exact_regex(sites), exclude_modules=None)

    with transaction(gm):  # ---- validated and computed: create the adapter, then fill it ----
        rewrite_graph(gm, config, adapter_name)
        new = {m.site_name: m for m in adapter_modules(gm).values() if m.adapter_name == adapter_name}
        for name, site in sites.items():
            method.load_site_tensors(new[name], site, tensors[name])
        gm.graph.lint()
