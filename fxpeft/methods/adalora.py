"""AdaLoRA: LoRA in SVD form with a rank budget that training reallocates (Zhang et al., 2023), interchangeable with
HF PEFT's ``AdaLoraConfig``. One file: config, sites, nodes, fold, PEFT's file format, and the training-loop side
(the rank allocator and the orthogonal regulariser).

The update of a site (PEFT's ``SVDLinear`` / ``SVDConv2d``), with ``s = lora_alpha`` (``r`` if ``lora_alpha <= 0``)
and ``ranknum`` the initial rank (PEFT's ``ranknum`` buffer)::

    y = base(x) + dropout(x) @ (A ⊙ E)ᵀ @ Bᵀ · s / (ranknum + 1e-5)      A [r, in·k],  E [r, 1],  B [out, r]

``A`` and ``B`` play the singular vectors, ``E`` the singular values. On a linear site the graph computes it in
factored form, ``((x·Aᵀ) ⊙ E·s/(ranknum+1e-5))·Bᵀ``: ``E`` joins the scaling of the rank-``r`` intermediate, so
sibling sites reading one input (q/k/v) share one down matmul (:mod:`fxpeft.passes.fuse`, generic to low-rank
chains). On a Conv2d it builds ``ΔW = B(A ⊙ E)·s/(ranknum+1e-5)``
in the weight's shape and convolves the input with it, as PEFT does. The scaling is a run-time buffer, 0 while the
adapter is off or merged.

**Training** (the user's loop; PEFT's ``AdaLoraModel`` does the first inside ``forward`` when labels are given)::

    loss = task_loss + fxpeft.adalora_orth_loss(gm)   # orth_reg_weight · mean ||AAᵀ - I||, ||BᵀB - I||
    loss.backward()
    optimizer.step()
    fxpeft.update_and_allocate(gm, step)             # after backward, before zero_grad: the gradients are read
    optimizer.zero_grad()

:func:`update_and_allocate` is PEFT's ``RankAllocator``: an EMA of each entry's sensitivity ``|p · ∂L/∂p|``
(``beta1``) and of its uncertainty (``beta2``), a score per singular triplet (``E_i`` plus the mean scores of row
``i`` of ``A`` and column ``i`` of ``B``), and a cubic budget schedule from ``init_r`` per site down to ``target_r``
per site between ``tinit`` and ``total_step - tfinal``, every ``deltaT`` steps. Triplets below the budget's score
threshold get ``E_i = 0`` (masked in place, shapes unchanged); the masks are PEFT's ``rank_pattern``. The EMA state
lives on each site's adapter module (non-persistent buffers), the schedule on the adapters too: nothing global.

**Files**: PEFT's keys under ``base_model.model.<site>.``: ``lora_A [r, in·k]``, ``lora_E [r, 1]``, ``lora_B [out, r]``
(``ranknum`` is not saved: it is the initial rank). After an allocation the file keeps only the unmasked triplets and
``adapter_config.json`` carries ``rank_pattern`` ``{"<site>.lora_E": [bool] * init_r}``; loading such a file builds
each site at the masked rank with ``ranknum = init_r``, PEFT's ``resize_modules_by_rank_pattern``.

Sites: ``nn.Linear``, HF ``Conv1D`` (a weight stored ``[in, out]``) and ungrouped Conv2d, PEFT 0.21.2's AdaLoRA
layers. Embeddings, Conv1d/Conv3d and grouped convolutions are refused.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxpeft.errors import AdapterFileError, ConfigError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry, config_from_fields
from fxpeft.sites import Site
from fxpeft.tags import Role

from .loha import add_to_output, common_value
from .lora import Lora, LoraDropout, _finite, _positive_int, adapter_dtype

__all__ = ["AdaLoraConfig", "AdaLoraAdapter", "AdaLora", "update_and_allocate", "adalora_orth_loss"]

aten = torch.ops.aten

#: the config fields that drive the allocator (kept on every adapter: the file writes them back)
_SCHEDULE = ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")
_KEYS = ("lora_A", "lora_E", "lora_B")


@dataclass
class AdaLoraConfig(PeftConfigBase):
    """AdaLoRA settings, with HF PEFT's field names and defaults.

    Args:
        target_r: the average rank per site the budget ends at.
        init_r: the rank every site starts with.
        tinit: warm-up steps before the budget starts to fall.
        tfinal: final steps at the target budget (the masks are then fixed).
        deltaT: steps between two reallocations while the budget falls.
        beta1: EMA factor of the sensitivity ``|p · grad|``.
        beta2: EMA factor of its uncertainty.
        orth_reg_weight: the weight :func:`adalora_orth_loss` gives the orthogonal regulariser.
        total_step: the number of training steps (required, as in PEFT).
        rank_pattern: ``{"<site>.lora_E": [bool] * init_r}``, the triplets an allocation kept (PEFT writes it after
            budget allocation); a site listed is built at the masked rank, as PEFT loads such a file.
        lora_alpha: scaling numerator: the update is scaled by ``lora_alpha / (ranknum + 1e-5)``.
        lora_dropout: dropout on the adapter's input (a ``call_module`` on ``nn.Dropout``).
        init_lora_weights: True (``E`` zero, ``A`` and ``B`` normal with std 0.02: the adapter starts as the identity)
            or False (all standard normal).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as for every method.

    Example:
        >>> from fxpeft import AdaLoraConfig
        >>> AdaLoraConfig(init_r=12, target_r=4, total_step=100, target_modules=["q_proj"]).peft_type
        'ADALORA'
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_lora_weights: bool = True


def _check_ints(config: AdaLoraConfig) -> None:
    if not _positive_int(config.init_r):
        raise ConfigError(f"init_r must be a positive integer (the starting rank), got {config.init_r!r}")
    for name, low in (("target_r", 0), ("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
        v = getattr(config, name)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
            raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
    if config.target_r > config.init_r:
        raise ConfigError(f"target_r={config.target_r} is larger than init_r={config.init_r}: the budget only falls; "
                          "set target_r <= init_r")
    t = config.total_step
    if not (isinstance(t, int) and not isinstance(t, bool) and t > 0):
        raise ConfigError(f"AdaLoRA needs total_step, the number of training steps, as an integer > 0 (got {t!r}), "
                          "as PEFT does")
    if config.tinit >= t - config.tfinal:
        raise ConfigError(f"tinit={config.tinit}, tfinal={config.tfinal} and total_step={t} leave no budgeting phase "
                          "(PEFT's rule: tinit < total_step - tfinal); decrease tfinal/tinit or increase total_step")


def _mask_site(key: Any) -> str | None:
    """The site a ``rank_pattern`` key names: ``<site>.lora_E``, or ``<site>.lora_E.<adapter>`` (PEFT in memory)."""
    site, sep, rest = str(key).rpartition(".lora_E")
    if not sep or not site or (rest and (not rest.startswith(".") or "." in rest[1:])):
        return None
    return site


def _check_rank_pattern(config: AdaLoraConfig) -> None:
    pattern = config.rank_pattern
    if pattern is None:
        return
    if not isinstance(pattern, dict):
        raise ConfigError(f"rank_pattern must be a dict {{'<site>.lora_E': [bool] * init_r}} or None, got {pattern!r}")
    for key, mask in pattern.items():
        if _mask_site(key) is None:
            raise ConfigError(f"rank_pattern key {key!r} is not '<site>.lora_E' (AdaLoRA's rank_pattern is the mask "
                              "PEFT writes after budget allocation, not LoRA's {pattern: r})")
        if not (isinstance(mask, (list, tuple)) and all(isinstance(b, bool) for b in mask)
                and len(mask) == config.init_r):
            raise ConfigError(f"rank_pattern[{key!r}] must be a list of {config.init_r} booleans (one per initial "
                              f"triplet), got {mask!r}")


def _site_positions(config: AdaLoraConfig, site: Site) -> list[int]:
    """The initial triplets ``site`` holds: those its ``rank_pattern`` mask keeps, else all ``init_r``."""
    for key, mask in (config.rank_pattern or {}).items():
        if _mask_site(key) == site.name:
            return [i for i, keep in enumerate(mask) if keep]
    return list(range(config.init_r))


def _fan_in(site: Site) -> int:
    return site.in_features * math.prod(site.kernel_size or (1,))


def _scale_value(scaling: float, ranknum: float, dtype: torch.dtype) -> torch.Tensor:
    """PEFT's ``scaling / (ranknum + 1e-5)``, with ``ranknum`` a tensor of the adapter's dtype as PEFT's buffer."""
    return torch.tensor(scaling, dtype=dtype) / (torch.tensor(ranknum, dtype=dtype) + 1e-5)


class AdaLoraAdapter(AdapterModule):
    """One AdaLoRA adapter at one site: ``A [r, in·k]``, ``E [r, 1]``, ``B [out, r]``, an optional ``dropout``, and
    the run-time ``scale`` buffer (``s / (ranknum + 1e-5)`` while on, 0 while off or merged).

    Also the allocator's per-site state: ``positions`` (which of the ``init_r`` initial triplets the rows are),
    ``rank_mask`` (the rows the last allocation kept, or None) and, once :func:`update_and_allocate` has run, the
    EMA buffers ``ipt_<X>`` / ``unc_<X>`` of ``A``, ``E`` and ``B``.
    """

    method = "adalora"

    def __init__(self, site: Site, adapter_name: str, config: AdaLoraConfig, positions: list[int],
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(site.name, adapter_name)
        self.kind, self.weight_shape, self.fan_in_fan_out = site.kind, tuple(site.weight_shape), site.fan_in_fan_out
        self.init_r, self.positions = int(config.init_r), tuple(positions)
        self.r = len(positions)
        self.lora_alpha = config.lora_alpha
        self.scaling = float(config.lora_alpha) if config.lora_alpha > 0 else float(self.r)
        # PEFT's ranknum: the initial rank, kept when a rank_pattern shrinks the site (0 for an emptied site)
        self.ranknum = float(self.init_r if self.r else 0)
        self.schedule = {k: getattr(config, k) for k in _SCHEDULE}
        kw = dict(dtype=dtype, device=device)
        # the rows the last allocation kept (bool [r]); a buffer, so that it moves with the graph (.to / .cuda)
        self.register_buffer("rank_mask", None, persistent=False)
        self.A = nn.Parameter(torch.empty(self.r, _fan_in(site), **kw))
        self.E = nn.Parameter(torch.empty(self.r, 1, **kw))
        self.B = nn.Parameter(torch.empty(site.out_features, self.r, **kw))
        self.register_buffer("scale", _scale_value(self.scaling, self.ranknum, dtype).to(device), persistent=False)
        if config.lora_dropout > 0:
            self.dropout = LoraDropout(config.lora_dropout)

    def gate_changed(self, on: bool) -> None:
        with torch.no_grad():
            self.scale.copy_(_scale_value(self.scaling, self.ranknum, self.scale.dtype) if on else 0.0)

    def reset_parameters(self, init: bool) -> None:
        """PEFT's init: ``E`` zero and ``A``, ``B`` normal(0, 0.02) (the identity), or all standard normal."""
        with torch.no_grad():
            if init:
                nn.init.zeros_(self.E)
                nn.init.normal_(self.A, 0.0, 0.02)
                nn.init.normal_(self.B, 0.0, 0.02)
            else:
                for p in (self.A, self.E, self.B):
                    p.copy_(torch.randn(p.shape))

    def kept_rows(self) -> list[int]:
        """The rows a file keeps: those the last allocation kept, else all."""
        if self.rank_mask is None:
            return list(range(self.r))
        return self.rank_mask.nonzero().flatten().tolist()

    def file_mask(self) -> list[bool]:
        """PEFT's ``rank_pattern`` entry for this site: over the ``init_r`` initial triplets, those the file keeps."""
        kept = {self.positions[i] for i in self.kept_rows()}
        return [i in kept for i in range(self.init_r)]

    def delta_weight(self) -> torch.Tensor:
        """The fp32 update ``B(A ⊙ E)·s/(ranknum + 1e-5)`` in the weight's layout (whether the adapter is on or not)."""
        A, E, B = (p.detach().float() for p in (self.A, self.E, self.B))
        delta = (B @ (A * E)) * _scale_value(self.scaling, self.ranknum, torch.float32).to(A.device)  # [out, in·k]
        if self.kind == "conv":
            return delta.reshape(self.weight_shape)  # -> [out, in, kh, kw]
        return delta.T if self.fan_in_fan_out else delta


# ------------------------------------------------------------------------------------------- the method


@PeftRegistry.register("adalora")
class AdaLora(Method):
    config_cls = AdaLoraConfig
    display_name = "AdaLoRA"
    color = ("#e5dbff", "#5f3dc4")
    site_kinds = frozenset({"linear", "conv"})
    spec_aliases = {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights", "r": "init_r"}
    default_targets = Lora.default_targets
    peft_default_table = "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING"
    # PEFT's LoraConfig fields that PEFT's AdaLoRA layers never read (it builds every site at init_r with lora_alpha)
    peft_fields = frozenset({"megatron_core", "megatron_config", "qalora_group_size", "loftq_config", "eva_config",
                             "corda_config", "lora_ga_config", "runtime_config", "ensure_weight_tying", "use_rslora",
                             "alpha_pattern", "lora_bias"})

    @classmethod
    def validate_config(cls, config: AdaLoraConfig) -> None:
        _check_ints(config)
        for name in ("beta1", "beta2"):
            v = getattr(config, name)
            if not (_finite(v) and 0 < v < 1):
                raise ConfigError(f"{name} must be a number in (0, 1) (an EMA factor), got {v!r}")
        if not (_finite(config.orth_reg_weight) and config.orth_reg_weight >= 0):
            raise ConfigError(f"orth_reg_weight must be a number >= 0, got {config.orth_reg_weight!r}")
        if not _finite(config.lora_alpha):
            raise ConfigError(f"lora_alpha must be a finite number, got {config.lora_alpha!r}")
        if not (_finite(config.lora_dropout) and 0.0 <= config.lora_dropout < 1.0):
            raise ConfigError(f"lora_dropout must be a number in [0, 1), got {config.lora_dropout!r}")
        if not isinstance(config.init_lora_weights, bool):
            raise ConfigError(f"init_lora_weights must be True or False, got {config.init_lora_weights!r}")
        _check_rank_pattern(config)

    @classmethod
    def check_site(cls, site: Site, config: AdaLoraConfig) -> str | None:
        if site.kind == "embedding":
            return ("PEFT's AdaLoRA does not adapt embeddings (it has layers for nn.Linear, Conv1D and nn.Conv2d "
                    "only); leave the embedding out of target_modules")
        if site.kind == "conv" and (len(site.kernel_size) != 2 or site.groups != 1):
            return (f"{len(site.kernel_size)}-d convolution with groups={site.groups}: PEFT's AdaLoRA adapts "
                    "ungrouped nn.Conv2d only")
        return super().check_site(site, config)

    @classmethod
    def check_selection(cls, config: AdaLoraConfig, sites: list[Site]) -> None:
        names = {s.name for s in sites}
        stray = [k for k in (config.rank_pattern or {}) if _mask_site(k) not in names]
        if stray:
            raise ConfigError(f"rank_pattern key(s) {stray[:3]} name no targeted site; each key is '<site>.lora_E' "
                              "for a site target_modules selects")

    @classmethod
    def build(cls, site: Site, config: AdaLoraConfig, adapter_name: str, weight: torch.Tensor) -> AdaLoraAdapter:
        adapter = AdaLoraAdapter(site, adapter_name, config, _site_positions(config, site),
                                 adapter_dtype(weight, config.keep_base_dtype), weight.device)
        adapter.reset_parameters(config.init_lora_weights)
        return adapter

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: AdaLoraAdapter) -> None:
        dtype = adapter.A.dtype
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        x = emit.call.input
        if dtype != base_dtype:
            x = emit.cast(x, dtype)
        if hasattr(adapter, "dropout"):
            x = emit.module("dropout", x, role=Role.DROPOUT, label="dropout")
        A, B = emit.param("A", Role.DOWN_WEIGHT, label="lora_A"), emit.param("B", Role.UP_WEIGHT, label="lora_B")
        E = emit.param("E", Role.PARAM, label="lora_E")
        s = emit.param("scale", Role.SCALING, label="scaling")  # s / (ranknum + 1e-5); 0 while off
        if site.kind == "conv":  # ΔW in the weight's shape, convolved as the base kernel is
            AE = emit.op(aten.mul.Tensor, A, E, label="A_E")  # A ⊙ E: [r, in·kh·kw]
            delta = emit.op(aten.mm.default, B, AE, label="BAE")  # [out, in·kh·kw]
            delta = emit.op(aten.mul.Tensor, delta, s, role=Role.SCALE, label="delta_flat")
            delta = emit.op(aten.reshape.default, delta, list(adapter.weight_shape), label="delta_weight")
            pad = site.padding if isinstance(site.padding, str) else list(site.padding)
            op = aten.conv2d.padding if isinstance(pad, str) else aten.conv2d.default
            out = emit.op(op, x, delta, None, list(site.stride), pad, list(site.dilation), 1,
                          label="delta")  # [N, out, H', W']
        else:  # x(A ⊙ E)ᵀ = (xAᵀ) ⊙ Eᵀ: E joins the scaling, so q/k/v siblings share one down matmul (passes.fuse)
            a = emit.op(aten.linear.default, x, A, role=Role.DOWN, label="down")  # [..., r]
            sE = emit.op(aten.mul.Tensor, emit.op(aten.view.default, E, [-1], label="E_row"), s,
                         label="E_scaled")  # [r]
            a = emit.op(aten.mul.Tensor, a, sE, role=Role.SCALE, label="scaled")
            out = emit.op(aten.linear.default, a, B, role=Role.UP, label="up")  # [..., out]
        add_to_output(emit, out, dtype, base_dtype)

    @classmethod
    def fold(cls, adapter: AdaLoraAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + adapter.delta_weight(), bias

    @classmethod
    def unfold(cls, adapter: AdaLoraAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight - adapter.delta_weight(), bias

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: AdaLoraConfig, site: Site) -> dict[str, tuple[int, ...]]:
        r = len(_site_positions(config, site))
        return {"lora_A": (r, _fan_in(site)), "lora_E": (r, 1), "lora_B": (site.out_features, r)}

    @classmethod
    def site_tensors(cls, adapter: AdaLoraAdapter, site: Site) -> dict[str, torch.Tensor]:
        rows = adapter.kept_rows()  # an allocation's masked triplets are not written (PEFT's rank_pattern)
        if len(rows) == adapter.r:
            return {"lora_A": adapter.A.detach(), "lora_E": adapter.E.detach(), "lora_B": adapter.B.detach()}
        idx = torch.tensor(rows, dtype=torch.long, device=adapter.A.device)
        return {"lora_A": adapter.A.detach()[idx], "lora_E": adapter.E.detach()[idx],
                "lora_B": adapter.B.detach()[:, idx]}

    @classmethod
    def load_site_tensors(cls, adapter: AdaLoraAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, p in zip(_KEYS, (adapter.A, adapter.E, adapter.B)):
                p.copy_(tensors[key])

    @classmethod
    def site_settings(cls, config: AdaLoraConfig, site: Site) -> dict[str, Any]:
        return {"positions": tuple(_site_positions(config, site)), "init_r": config.init_r,
                "lora_alpha": config.lora_alpha, **{k: getattr(config, k) for k in _SCHEDULE}}

    @classmethod
    def adapter_settings(cls, adapter: AdaLoraAdapter) -> dict[str, Any]:
        return {"positions": tuple(adapter.positions[i] for i in adapter.kept_rows()), "init_r": adapter.init_r,
                "lora_alpha": adapter.lora_alpha, **adapter.schedule}

    @classmethod
    def config_fields(cls, adapters: dict[str, AdaLoraAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        fields = {k: common_value(adapters, k, lambda m, k=k: m.schedule[k]) for k in _SCHEDULE}
        fields.update(init_r=common_value(adapters, "init_r", lambda m: m.init_r),
                      lora_alpha=common_value(adapters, "lora_alpha", lambda m: m.lora_alpha))
        masks = {n: m.file_mask() for n, m in adapters.items()}
        shrunk = any(not all(mask) for mask in masks.values())
        dropouts = [getattr(getattr(m, "dropout", None), "p", 0.0) for m in adapters.values()]
        return {**fields, "lora_dropout": Counter(dropouts).most_common(1)[0][0], "init_lora_weights": True,
                "rank_pattern": {f"{n}.lora_E": mask for n, mask in masks.items()} if shrunk else None,
                "bias": "none", "layers_to_transform": None, "layers_pattern": None,
                "fan_in_fan_out": any(sites[n].module_type == "Conv1D" for n in adapters)}

    @classmethod
    def config_from_peft(cls, fields: dict[str, Any]) -> AdaLoraConfig:
        fields = dict(fields)
        if fields.get("use_dora"):
            raise AdapterFileError("the adapter sets use_dora=True, which AdaLoRA does not support (PEFT refuses it "
                                   "too)")
        bias = fields.pop("bias", "none")
        if bias not in (None, "none"):
            raise AdapterFileError(f"the adapter sets bias={bias!r}: trained biases with AdaLoRA are not supported by "
                                   "fxpeft yet; use bias='none'")
        fields.pop("r", None)  # PEFT's AdaLoRA ignores r: every site starts at init_r
        if "init_lora_weights" in fields:  # PEFT's AdaLoRA reads it as a truth value (any string: its default init)
            fields["init_lora_weights"] = bool(fields["init_lora_weights"])
        return config_from_fields(cls, fields)


# ------------------------------------------------------------------------------------------- training loop


def _adalora_adapters(gm: nn.Module, adapter_name: str | None) -> list[AdaLoraAdapter]:
    """The AdaLoRA adapter modules of one adapter (found by type), in the graph's module order."""
    mods = [m for m in gm.modules() if isinstance(m, AdaLoraAdapter)]
    names = sorted({m.adapter_name for m in mods})
    if adapter_name is None:
        if len(names) != 1:
            raise ConfigError(f"the graph holds AdaLoRA adapters {names}; pass adapter_name= (the one you train)"
                              if names else "the graph holds no AdaLoRA adapter; rewrite it with an AdaLoraConfig "
                              "first")
        adapter_name = names[0]
    own = [m for m in mods if m.adapter_name == adapter_name]
    if not own:
        raise ConfigError(f"the graph holds no AdaLoRA adapter named {adapter_name!r} (it holds {names})")
    return own


def _budget_schedule(sched: dict[str, Any], step: int, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
    """PEFT's budget at ``step`` and whether to mask then: flat to ``tinit``, cubic down to ``total_step - tfinal``."""
    tinit, tfinal, total = sched["tinit"], sched["tfinal"], sched["total_step"]
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt), step % sched["deltaT"] == 0


def _update_ipt(mods: list[AdaLoraAdapter], beta1: float, beta2: float) -> None:
    """The EMAs of each entry's sensitivity ``|p · grad|`` and of its deviation from that EMA (``update_ipt``)."""
    for m in mods:
        for key, p in (("A", m.A), ("E", m.E), ("B", m.B)):
            if p.grad is None:
                raise ConfigError(f"update_and_allocate reads the gradients, and {m.site_name}'s {key} has none: call "
                                  "it after loss.backward() and before optimizer.zero_grad()")
            if getattr(m, f"ipt_{key}", None) is None:  # first call: zero state, as PEFT's
                m.register_buffer(f"ipt_{key}", torch.zeros_like(p), persistent=False)
                m.register_buffer(f"unc_{key}", torch.zeros_like(p), persistent=False)
            with torch.no_grad():
                ipt = (p * p.grad).abs().detach()
                avg = beta1 * getattr(m, f"ipt_{key}") + (1 - beta1) * ipt
                unc = beta2 * getattr(m, f"unc_{key}") + (1 - beta2) * (ipt - avg).abs()
                setattr(m, f"ipt_{key}", avg)
                setattr(m, f"unc_{key}", unc)


def _reset_ipt(mods: list[AdaLoraAdapter]) -> None:
    for m in mods:
        for key in ("A", "E", "B"):
            for name in (f"ipt_{key}", f"unc_{key}"):
                m._buffers.pop(name, None)


def _triplet_scores(m: AdaLoraAdapter) -> torch.Tensor:
    """A score per singular triplet ``[r]``: ``E_i``'s plus the means of row ``i`` of ``A`` and column ``i`` of B."""
    score = {k: getattr(m, f"ipt_{k}") * getattr(m, f"unc_{k}") for k in ("A", "E", "B")}
    a = torch.mean(score["A"], dim=1, keepdim=True)  # [r, 1]
    b = torch.mean(score["B"], dim=0, keepdim=False).view(-1, 1)  # [r, 1]
    ab = torch.cat([a, b], dim=1).sum(dim=1, keepdim=False)  # [r]
    return score["E"].view(-1) + ab.view(-1)


def _mask_to_budget(mods: list[AdaLoraAdapter], budget: int, init_bgt: int) -> None:
    """Zero ``E_i`` of the ``init_bgt - budget`` lowest-scoring triplets over all sites; record the masks."""
    if any(getattr(m, "ipt_A", None) is None for m in mods):
        raise ConfigError("update_and_allocate has no sensitivity estimates to allocate with: call it at every step "
                          "from the first (its EMAs start then)")
    scores = [_triplet_scores(m) for m in mods]
    k = init_bgt - budget
    # k <= 0 (target_r == init_r, or a loaded adapter already under budget): nothing to drop (PEFT fails here)
    threshold = torch.kthvalue(torch.cat(scores), k=k)[0].item() if k > 0 else -math.inf
    with torch.no_grad():
        for m, score in zip(mods, scores):
            dropped = score.view(-1, 1) <= threshold  # [r, 1]
            m.E.masked_fill_(dropped, 0.0)
            m.rank_mask = ~dropped.view(-1)


def update_and_allocate(gm: nn.Module, global_step: int, adapter_name: str | None = None) -> int:
    """AdaLoRA's rank allocation for one training step, PEFT's ``AdaLoraModel.update_and_allocate``.

    Call it every step after ``loss.backward()`` (and ``optimizer.step()``) and before ``optimizer.zero_grad()``:
    it reads the adapter's gradients. Until ``total_step - tfinal`` it updates the sensitivity EMAs and, every
    ``deltaT`` steps after ``tinit``, zeroes ``E`` of the triplets below the budget (a cubic schedule from ``init_r`` to
    ``target_r`` per site); at ``total_step - tfinal`` it fixes the masks at the target budget; later it re-applies
    them. The masks are what :func:`fxpeft.save_adapter` writes as ``rank_pattern``.

    Args:
        gm: a graph holding an AdaLoRA adapter.
        global_step: the training step (0-based, as PEFT's examples count).
        adapter_name: the AdaLoRA adapter to allocate; may be omitted when the graph holds one.

    Returns:
        The rank budget (total kept triplets over the sites) in force after this step.

    Raises:
        ConfigError: no such adapter, it is merged, or its gradients are missing.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.AdaLoraConfig(init_r=3, target_r=1, total_step=4, target_modules=["0"]))
        >>> for step in range(4):
        ...     (gm(torch.randn(2, 4)).sum() + fxpeft.adalora_orth_loss(gm)).backward()
        ...     budget = fxpeft.update_and_allocate(gm, step); gm.zero_grad()
        >>> budget
        1
    """
    mods = _adalora_adapters(gm, adapter_name)
    if any(m.merged for m in mods):
        raise ConfigError("update_and_allocate on a merged AdaLoRA adapter would mask E behind the merged weight; "
                          "unmerge it first (fxpeft.unmerge_adapter)")
    sched = common_value({m.site_name: m for m in mods}, "the AdaLoRA schedule", lambda m: tuple(m.schedule.items()))
    sched = dict(sched)
    init_bgt = sum(m.r for m in mods)
    target_bgt = sched["target_r"] * len(mods)
    end = sched["total_step"] - sched["tfinal"]
    if global_step < end:
        _update_ipt(mods, sched["beta1"], sched["beta2"])
        budget, mask = _budget_schedule(sched, global_step, init_bgt, target_bgt)
        if mask:
            _mask_to_budget(mods, budget, init_bgt)
        return budget
    if global_step == end:  # the final allocation: at the target budget, then the estimates are dropped
        budget, _ = _budget_schedule(sched, global_step, init_bgt, target_bgt)
        _mask_to_budget(mods, budget, init_bgt)
        _reset_ipt(mods)
        return budget
    with torch.no_grad():  # the final phase: the fixed masks, re-applied (the optimizer may have moved E)
        for m in mods:
            if m.rank_mask is None:
                raise ConfigError(f"step {global_step} is in AdaLoRA's final phase but no allocation ran: call "
                                  "update_and_allocate at every step, from the first")
            m.E.masked_fill_(~m.rank_mask.view(-1, 1), 0.0)
    return target_bgt


def adalora_orth_loss(gm: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """AdaLoRA's orthogonal regulariser, ``orth_reg_weight · mean(||AAᵀ - I||_F, ||BᵀB - I||_F)`` over the adapter's
    ``A`` and ``B`` at every site: add it to the training loss (PEFT's ``AdaLoraModel.forward`` adds it to
    ``outputs.loss`` when labels are given; a graph returns logits, so the loop adds it).

    Args:
        gm: a graph holding an AdaLoRA adapter.
        adapter_name: the AdaLoRA adapter; may be omitted when the graph holds one.

    Returns:
        A 0-dim tensor with a gradient to ``A`` and ``B``.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.AdaLoraConfig(init_r=2, total_step=10, target_r=1, target_modules=["0"]))
        >>> bool(fxpeft.adalora_orth_loss(gm) > 0)
        True
    """
    mods = _adalora_adapters(gm, adapter_name)
    weight = common_value({m.site_name: m for m in mods}, "orth_reg_weight", lambda m: m.schedule["orth_reg_weight"])
    total = None
    for m in mods:
        for cov in (m.A @ m.A.T, m.B.T @ m.B):  # [r, r]
            eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
            term = torch.norm(cov - eye, p="fro")
            total = term if total is None else total + term
    return weight * (total / (2 * len(mods)))
