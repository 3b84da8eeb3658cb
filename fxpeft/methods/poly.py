"""Poly (Polytropon) and MHR: an inventory of LoRA "skills" per site, mixed per batch row by a learned router over
tasks, interchangeable with HF PEFT's ``PolyConfig``. One file: config, sites, nodes, and PEFT's file format.

Each row ``b`` of the batch names its task, ``task_ids[b]``, a forward keyword (PEFT: ``model(x, task_ids=...)``;
here ``gm(*args, task_ids=...)``, a graph input added by :meth:`fxpeft.registry.Emit.input`). At a site with
``K = n_skills`` skills, ``S = n_splits`` splits (``S > 1``: Multi-Head Routing) and rank ``r``::

    w[b]  = router(task_ids[b])                       [S, K]     mixing weights, each split's row sums to 1
    A[b]  = einsum("qs,qsdr->qdr", w[b], poly_lora_A) -> [in, r]     poly_lora_A [S, K, in/S, r]
    B[b]  = einsum("qs,qsrd->qrd", w[b], poly_lora_B) -> [r, out]    poly_lora_B [S, K, r, out/S] (split-major)
    y[b]  = base(x[b]) + x[b] @ A[b] @ B[b] / r

The router (:class:`PolyRouter`, PEFT's) holds ``module_logits [n_tasks, S·K]``: in eval the weights are
``sigmoid(logits)``, in training a relaxed Bernoulli sample (temperature 1, fresh logistic noise per call), each
normalised over the skills of its split. It is a ``call_module`` node, so ``train()`` / ``eval()`` switch it; the
mixing and the two batched matmuls (``bmm``, one per-row factor each, as in a mixed batch) are graph nodes.

Sites: ``nn.Linear`` only (PEFT's Poly has no other layer), with ``in`` and ``out`` divisible by ``n_splits``.
Poly cannot be merged as such (nor can PEFT's): the update depends on each row's task, so no single weight holds
it. To serve one task from merged weights, :func:`set_merge_task` names the task the merges fold (the eval router's
mixture for that task), then ``fxpeft.merge_adapter`` / ``fxpeft.merge`` work as for any method.

PEFT's file layout (keys under ``base_model.model.<site>.``)::

    poly_lora_A                  [n_splits, n_skills, in / n_splits, r]
    poly_lora_B                  [n_splits, n_skills, r, out / n_splits]
    poly_router.module_logits    [n_tasks, n_splits · n_skills]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import ConfigError, InputShapeError, MergeError, UnsupportedSiteError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Site
from fxpeft.tags import Role

from .loha import add_to_output, common_value
from .lora import Lora, _positive_int, adapter_dtype

__all__ = ["PolyConfig", "PolyAdapter", "PolyRouter", "Poly", "TASK_IDS", "set_merge_task"]

aten = torch.ops.aten

#: the forward keyword that names each batch row's task (PEFT's)
TASK_IDS = "task_ids"
#: PEFT's guard against a zero sum of mixing weights
_EPS = 1e-12


@dataclass
class PolyConfig(PeftConfigBase):
    """Poly settings, with HF PEFT's field names and defaults.

    Args:
        r: rank of each skill's LoRA.
        poly_type: the router; ``"poly"`` (PEFT's only one).
        n_tasks: number of tasks: ``task_ids`` take values ``0 .. n_tasks - 1``.
        n_skills: number of skills (LoRAs) per site.
        n_splits: splits of each LoRA, routed separately (``> 1``: Multi-Head Routing); divides ``in`` and ``out``.
        init_weights: True (``poly_lora_B`` zero: the adapter starts as the identity) or False (all random).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as for every method.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> gm = fxpeft.rewrite(gm, fxpeft.PolyConfig(r=2, n_tasks=3, n_skills=2, target_modules=["0"]))
        >>> gm(torch.randn(2, 4), task_ids=torch.tensor([0, 2])).shape
        torch.Size([2, 4])
    """

    r: int = 8
    poly_type: str = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1
    init_weights: bool = True


class PolyRouter(nn.Module):
    """PEFT's ``PolyRouter``: each row's task logits ``[n_splits, n_skills]``, made mixing weights.

    In eval: ``sigmoid(logits)``; in training: a relaxed Bernoulli sample at temperature 1 (PEFT's
    ``RelaxedBernoulli(1.0, logits=...).rsample()``, the same draws from the same seed); then each split's weights
    are divided by their sum (``+ 1e-12``).
    """

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.n_tasks, self.n_splits, self.n_skills = n_tasks, n_splits, n_skills
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills, dtype=dtype, device=device))

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        if type(task_ids) is torch.Tensor and not torch.compiler.is_compiling() and task_ids.numel():
            # eager only: a data-dependent check would break compile and export
            lo, hi = int(task_ids.min()), int(task_ids.max())
            if lo < 0 or hi >= self.n_tasks:
                raise InputShapeError(f"{TASK_IDS} holds task id {hi if hi >= self.n_tasks else lo}, but the Poly "
                                      f"adapter has n_tasks={self.n_tasks} (ids 0..{self.n_tasks - 1})")
        task_ids = task_ids.to(self.module_logits.device)  # as PEFT: ids may come on another device
        logits = self.module_logits.index_select(0, task_ids).view(-1, self.n_splits, self.n_skills)  # [B, S, K]
        if self.training:
            probs = torch.sigmoid(logits)
            tiny, eps = torch.finfo(logits.dtype).tiny, torch.finfo(logits.dtype).eps
            probs = probs.clamp(eps, 1 - eps)  # torch.distributions' clamp_probs, as PEFT's sampler applies it
            u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device).clamp(eps, 1 - eps)
            noisy = u.log() - (-u).log1p() + probs.log() - (-probs).log1p()  # logistic noise + logits
            weights = torch.sigmoid(noisy).clamp(tiny, 1 - eps)
        else:
            weights = torch.sigmoid(logits)
        return weights / (weights.sum(dim=-1, keepdim=True) + _EPS)

    def reset(self) -> None:
        """PEFT's init: logits uniform in ±1e-3 (every task starts with near-equal skill weights)."""
        with torch.no_grad():
            nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, n_splits={self.n_splits}, n_skills={self.n_skills}"


def check_task_ids(task_ids: Any, name: str, batch_source: Any) -> torch.Tensor:
    """The graph's first step on ``task_ids``: a typed error naming the keyword for a missing or misshapen one."""
    if not isinstance(task_ids, torch.Tensor) or task_ids.dim() != 1 or task_ids.is_floating_point() \
            or task_ids.is_complex() or task_ids.dtype is torch.bool:
        got = (f"a {task_ids.dtype} tensor of shape {tuple(task_ids.shape)}" if isinstance(task_ids, torch.Tensor)
               else repr(task_ids))
        raise InputShapeError(f"this graph's Poly adapters route each batch row by the forward keyword {name}=: "
                              f"pass a 1-D int64 tensor with one task id per row, gm(*args, {name}=torch.tensor"
                              f"([...])); got {got}")
    if isinstance(batch_source, torch.Tensor) and batch_source.dim():
        n, batch = task_ids.shape[0], batch_source.shape[0]
        if isinstance(n, int) and isinstance(batch, int) and n != batch:
            raise InputShapeError(f"{name} has {n} entries but the batch has {batch} rows; give one task id per row")
        torch._check(n == batch)  # under torch.export / compile: the ids and the batch share their size
    return task_ids.long()


class PolyAdapter(AdapterModule):
    """One Poly adapter at one site: PEFT's tensors under PEFT's names (the router's ``module_logits`` in
    :class:`PolyRouter`), and the run-time ``scale`` buffer (``1 / r`` while on, 0 while off)."""

    method = "poly"

    def __init__(self, site: Site, adapter_name: str, config: PolyConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site.name, adapter_name)
        self.in_features, self.out_features = site.in_features, site.out_features
        self.r, self.n_tasks, self.n_skills, self.n_splits = config.r, config.n_tasks, config.n_skills, config.n_splits
        S, K, r = self.n_splits, self.n_skills, self.r
        self.poly_lora_A = nn.Parameter(torch.empty(S, K, self.in_features // S, r, dtype=dtype, device=device))
        self.poly_lora_B = nn.Parameter(torch.empty(S, K, r, self.out_features // S, dtype=dtype, device=device))
        self.poly_router = PolyRouter(self.n_tasks, S, K, dtype, device)
        self.register_buffer("scale", torch.tensor(1.0 / r, dtype=dtype, device=device), persistent=False)
        self.merge_task: int | None = None  # the task a fold writes (set_merge_task); None: folds are refused

    def gate_changed(self, on: bool) -> None:
        with torch.no_grad():
            self.scale.fill_(1.0 / self.r if on else 0.0)

    def reset_parameters(self, init: bool) -> None:
        """PEFT's init: each skill's and split's A kaiming-uniform as an ``[r, in/S]`` linear weight (stored
        transposed), B zero when ``init`` (else likewise), router logits uniform in ±1e-3."""
        with torch.no_grad():
            for t in (self.poly_lora_A,) if init else (self.poly_lora_A, self.poly_lora_B):
                for split in range(self.n_splits):
                    for skill in range(self.n_skills):
                        w = torch.empty(t.shape[3], t.shape[2], dtype=t.dtype, device=t.device)
                        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                        t[split, skill] = w.T
            if init:
                nn.init.zeros_(self.poly_lora_B)
            self.poly_router.reset()

    def task_delta(self, task: int) -> torch.Tensor:
        """The fp32 update ΔW ``[out, in]`` every row of task ``task`` gets (the eval router's mixture)."""
        S, K, r = self.n_splits, self.n_skills, self.r
        with torch.no_grad():
            w = torch.sigmoid(self.poly_router.module_logits[task].float()).view(S, K)
            w = w / (w.sum(dim=-1, keepdim=True) + _EPS)  # [S, K]
            A = torch.einsum("qs,qsdr->qdr", w, self.poly_lora_A.float()).reshape(self.in_features, r)  # [in, r]
            B = torch.einsum("qs,qsrd->qrd", w, self.poly_lora_B.float())  # [S, r, out/S]
            B = B.transpose(0, 1).reshape(r, self.out_features)  # [r, out]
            return (A @ B).T / r


_KEYS = ("poly_lora_A", "poly_lora_B", "poly_router.module_logits")


def _shapes(site: Site, r: int, n_tasks: int, n_skills: int, n_splits: int) -> dict[str, tuple[int, ...]]:
    return {"poly_lora_A": (n_splits, n_skills, site.in_features // n_splits, r),
            "poly_lora_B": (n_splits, n_skills, r, site.out_features // n_splits),
            "poly_router.module_logits": (n_tasks, n_splits * n_skills)}


@PeftRegistry.register("poly")
class Poly(Method):
    config_cls = PolyConfig
    display_name = "Poly"
    color = ("#fff3bf", "#e67700")
    site_kinds = frozenset({"linear"})
    spec_aliases = {"init": "init_weights", "tasks": "n_tasks", "skills": "n_skills", "splits": "n_splits"}
    default_targets = Lora.default_targets  # PEFT's Poly table is a copy of LoRA's
    peft_default_table = "TRANSFORMERS_MODELS_TO_POLY_TARGET_MODULES_MAPPING"

    @classmethod
    def validate_config(cls, config: PolyConfig) -> None:
        for name in ("r", "n_tasks", "n_skills", "n_splits"):
            if not _positive_int(getattr(config, name)):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(config, name)!r}")
        if config.poly_type != "poly":
            raise ConfigError(f"poly_type={config.poly_type!r} is not supported; PEFT's only router is 'poly'")
        if not isinstance(config.init_weights, bool):
            raise ConfigError(f"init_weights must be True or False, got {config.init_weights!r}")

    @classmethod
    def check_site(cls, site: Site, config: PolyConfig) -> str | None:
        if site.kind != "linear" or site.fan_in_fan_out:
            what = "a weight stored [in, out]" if site.kind == "linear" else f"a {site.kind} site"
            return f"{what} ({site.module_type or site.kind}): PEFT's Poly adapts nn.Linear only"
        bad = [f"{n}={v}" for n, v in (("in", site.in_features), ("out", site.out_features)) if v % config.n_splits]
        if bad:
            return f"{', '.join(bad)} not divisible by n_splits={config.n_splits}"
        return super().check_site(site, config)

    @classmethod
    def build(cls, site: Site, config: PolyConfig, adapter_name: str, weight: torch.Tensor) -> PolyAdapter:
        adapter = PolyAdapter(site, adapter_name, config, adapter_dtype(weight, config.keep_base_dtype), weight.device)
        adapter.reset_parameters(config.init_weights)
        return adapter

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: PolyAdapter) -> None:
        dtype = adapter.poly_lora_A.dtype
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        r, n_in, n_out = adapter.r, adapter.in_features, adapter.out_features
        task_ids = emit.input(TASK_IDS, check_task_ids)  # [B] int64, checked once per call
        w = emit.module("poly_router", task_ids, label="mixing_weights")  # [B, S, K]
        A = emit.param("poly_lora_A", Role.DOWN_WEIGHT, label="poly_lora_A")  # [S, K, in/S, r]
        B = emit.param("poly_lora_B", Role.UP_WEIGHT, label="poly_lora_B")  # [S, K, r, out/S]
        A_rows = emit.op(aten.einsum.default, "bqs,qsdr->bqdr", [w, A],
                         label="A_mixed")  # [B, S, in/S, r]
        A_rows = emit.op(aten.reshape.default, A_rows, [-1, n_in, r], label="A_rows")  # [B, in, r]
        B_rows = emit.op(aten.einsum.default, "bqs,qsrd->bqrd", [w, B],
                         label="B_mixed")  # [B, S, r, out/S]
        B_rows = emit.op(aten.transpose.int, B_rows, 1, 2, label="B_split_last")  # [B, r, S, out/S]
        B_rows = emit.op(aten.reshape.default, B_rows, [-1, r, n_out], label="B_rows")  # [B, r, out]
        x, y = emit.call.input, emit.call.node
        if dtype != base_dtype:
            x = emit.cast(x, dtype)
        batch = emit.op(aten.sym_size.int, task_ids, 0, label="batch")
        rows = emit.op(aten.reshape.default, x, [batch, -1, n_in], label="x_rows")  # [B, L, in]
        down = emit.op(aten.bmm.default, rows, A_rows, role=Role.DOWN, label="down")  # [B, L, r]
        s = emit.param("scale", Role.SCALING, label="scaling")  # 1/r, 0 while off
        down = emit.op(aten.mul.Tensor, down, s, role=Role.SCALE, label="down_scaled")
        up = emit.op(aten.bmm.default, down, B_rows, role=Role.UP, label="up")  # [B, L, out]
        shape = emit.op(aten.sym_size.default, y, label="out_shape")
        delta = emit.op(aten.reshape.default, up, shape, label="delta")  # [B, L, out] -> y's shape
        add_to_output(emit, delta, dtype, base_dtype)

    @classmethod
    def insert_mixed(cls, emit: Emit, site: Site, slots: list[PolyAdapter | None]) -> None:
        raise UnsupportedSiteError(f"Poly adapters (at {site.name!r}) have no mixed-batch form: Poly already mixes "
                                   f"per row, by {TASK_IDS}=; serve one Poly adapter per call (fxpeft.set_adapter)")

    @classmethod
    def fold(cls, adapter: PolyAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        if adapter.merge_task is None:
            raise MergeError(f"Poly adapter {adapter.adapter_name!r} cannot be merged (nor can PEFT's): its update "
                             f"mixes the skills by each row's {TASK_IDS}, so no single weight holds it. Keep it "
                             "unmerged, or merge one task: fxpeft.methods.poly.set_merge_task(gm, task) first")
        return weight + adapter.task_delta(adapter.merge_task), bias

    @classmethod
    def unfold(cls, adapter: PolyAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight - adapter.task_delta(adapter.merge_task), bias

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: PolyConfig, site: Site) -> dict[str, tuple[int, ...]]:
        return _shapes(site, config.r, config.n_tasks, config.n_skills, config.n_splits)

    @classmethod
    def site_tensors(cls, adapter: PolyAdapter, site: Site) -> dict[str, torch.Tensor]:
        return {"poly_lora_A": adapter.poly_lora_A.detach(), "poly_lora_B": adapter.poly_lora_B.detach(),
                "poly_router.module_logits": adapter.poly_router.module_logits.detach()}

    @classmethod
    def load_site_tensors(cls, adapter: PolyAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            adapter.poly_lora_A.copy_(tensors["poly_lora_A"])
            adapter.poly_lora_B.copy_(tensors["poly_lora_B"])
            adapter.poly_router.module_logits.copy_(tensors["poly_router.module_logits"])

    @classmethod
    def site_settings(cls, config: PolyConfig, site: Site) -> dict[str, Any]:
        return {"r": config.r, "n_tasks": config.n_tasks, "n_skills": config.n_skills, "n_splits": config.n_splits}

    @classmethod
    def adapter_settings(cls, adapter: PolyAdapter) -> dict[str, Any]:
        return {"r": adapter.r, "n_tasks": adapter.n_tasks, "n_skills": adapter.n_skills, "n_splits": adapter.n_splits}

    @classmethod
    def config_fields(cls, adapters: dict[str, PolyAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        fields = {name: common_value(adapters, name, lambda m, name=name: getattr(m, name))
                  for name in ("r", "n_tasks", "n_skills", "n_splits")}
        return {**fields, "poly_type": "poly", "init_weights": True}  # PEFT's PolyConfig has no layer fields


def set_merge_task(gm: fx.GraphModule, task: int | None, adapter_name: str | None = None) -> None:
    """Make the merges fold the Poly adapters (all, or ``adapter_name``'s) as they serve the one task ``task``.

    ``fxpeft.merge_adapter`` then writes that task's update into the base weights (every row gets task
    ``task``, whatever its ``task_ids``), and ``fxpeft.merge`` gives a graph without adapters, nor ``task_ids``,
    for that task. ``None`` refuses merges again.

    Raises:
        ConfigError: no such Poly adapter, a task id out of range, or an adapter already merged (unmerge first).

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.methods.poly import set_merge_task
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.PolyConfig(r=2, n_tasks=3, target_modules=["0"], init_weights=False)).eval()
        >>> x = torch.randn(2, 4); task_1 = gm(x, task_ids=torch.tensor([1, 1]))
        >>> set_merge_task(gm, 1)
        >>> torch.allclose(fxpeft.merge(gm)(x), task_1, atol=1e-6)
        True
    """
    mods = [m for m in gm.modules() if isinstance(m, PolyAdapter) and adapter_name in (None, m.adapter_name)]
    if not mods:
        raise ConfigError(f"the graph holds no Poly adapter{'' if adapter_name is None else f' named {adapter_name!r}'}")
    merged = sorted({m.adapter_name for m in mods if m.merged})
    if merged:
        raise ConfigError(f"Poly adapter(s) {merged} are merged with their task; unmerge them first "
                          "(fxpeft.unmerge_adapter)")
    n_tasks = min(m.n_tasks for m in mods)
    if task is not None and not (isinstance(task, int) and not isinstance(task, bool) and 0 <= task < n_tasks):
        raise ConfigError(f"task {task!r} is not a task id of the Poly adapter(s): use one of 0..{n_tasks - 1}")
    for m in mods:
        m.merge_task = task
