"""LoHa: a low-rank Hadamard-product update (FedPara), interchangeable with HF PEFT's ``LoHaConfig``. One file:
config, sites, nodes, fold, and PEFT's file format (the helpers LoHa and LoKr share, PEFT's ``lycoris_utils``,
live here too).

The update of a site's weight, in the weight's own shape (``s = alpha / r``)::

    ΔW = s · (W1a @ W1b) ⊙ (W2a @ W2b)          W1a, W2a [out, r];  W1b, W2b [r, in·k]   (k: the kernel's size)

With ``use_effective_conv2d`` on a Conv1d/Conv2d whose kernel is not all ones (FedPara's "Proposition 3", PEFT's
CP form), each factor is a core ``t [r, r, kh, kw]`` (``[r, r, k, 1]`` for a Conv1d) times ``Wa [r, out]`` and
``Wb [r, in]``::

    ΔW = s · einsum("ijkl,jr,ip->prkl", t1, W1b, W1a) ⊙ einsum("ijkl,jr,ip->prkl", t2, W2b, W2a)

**In the graph** ΔW is built from the factors on every call, as in PEFT (its cost does not grow with the batch).
The scaling multiplies ``W1a`` (``[out, r]``), not ΔW. Then, where the call reads its weight as a graph value and
the adapter shares the base's fp32/fp64 dtype, the call reads ``W + ΔW``: one matmul (or conv) where PEFT runs two,
``base(x) + linear(x, ΔW)``, and one input gradient in the backward where PEFT computes two. Elsewhere (a
``call_module`` site of a symbolic_trace graph; a bf16/fp16 base with an fp32 adapter) the graph adds
``linear(x, ΔW)`` / ``conv(x, ΔW)`` to the output, PEFT's form, in the adapter's dtype with the sum cast back once.

**Training only**, as in PEFT: ``module_dropout`` skips the whole adapter for a call with probability p
(:class:`ModuleDropout`, on the scaling); ``rank_dropout`` drops rows (outputs) of ΔW, the kept rows divided by the
kept fraction (:class:`RankDropout`, on ``W1a``'s rows: row i of ΔW is row i of ``W1a`` times the rest). Both are
``call_module`` nodes that ``train()`` / ``eval()`` switch; in eval they pass their input through.

Sites: ``nn.Linear``, Conv1d and Conv2d (grouped too), as PEFT 0.21.2. Embeddings, 3-d convolutions and weights
stored ``[in, out]`` (HF ``Conv1D``, ``x @ W``) are refused: PEFT's LoHa has no layer for them.

PEFT's file layout (keys ``base_model.model.<site>.hada_w1_a`` ...)::

    hada_w1_a, hada_w2_a   [out, r]            (CP form: [r, out])
    hada_w1_b, hada_w2_b   [r, in·k]           (CP form: [r, in])
    hada_t1, hada_t2       [r, r, kh, kw]      (CP form only; [r, r, k, 1] for a Conv1d)
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn

from fxpeft.errors import AdapterFileError, ConfigError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Site
from fxpeft.tags import Role

from .lora import Lora, _finite, adapter_dtype, check_rank_alpha, pattern_value, warn_unused_patterns

__all__ = ["LoHaConfig", "LoHaAdapter", "LoHa", "ModuleDropout", "RankDropout"]

aten = torch.ops.aten


@dataclass
class LoHaConfig(PeftConfigBase):
    """LoHa settings, with HF PEFT's field names and defaults.

    Args:
        r: rank of each of the two low-rank factors.
        alpha: scaling numerator: the update is scaled by ``alpha / r``.
        rank_dropout: in training, the probability of dropping each output row of ΔW (kept rows rescaled).
        module_dropout: in training, the probability of skipping the adapter for a whole call.
        use_effective_conv2d: the CP form on Conv1d/Conv2d sites whose kernel is not all ones.
        init_weights: True (``hada_w2_b`` zero: the adapter starts as the identity) or False (all random).
        rank_pattern: ``{pattern: r}`` overrides per site (PEFT's matching: ``(.*\\.)?pattern$``).
        alpha_pattern: ``{pattern: alpha}`` overrides per site.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as for every method.

    Example:
        >>> from fxpeft import LoHaConfig
        >>> LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]).peft_type
        'LOHA'
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------ shared by LoHa and LoKr


class ModuleDropout(nn.Module):
    """PEFT's ``module_dropout``: in training, the adapter is skipped for the whole call with probability ``p``
    (the scaling it is given becomes 0; PEFT draws ``torch.rand(1) > p``); in eval, the scaling passes through."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return scale
        keep = torch.rand((), device=scale.device) > self.p
        return scale * keep.to(scale.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RankDropout(nn.Module):
    """PEFT's ``rank_dropout``: in training, each output row of ΔW is dropped with probability ``p`` (one mask per
    call, PEFT's ``torch.rand(out) > p``), and with ``rescale`` the kept rows are divided by the kept fraction; in
    eval, the input passes through.

    It multiplies its input along ``dim``, an axis that runs over the outputs (a factor's rows, ΔW's rows, or the
    update's last axis). Where every row is dropped the result is 0 (PEFT divides 0 by 0 there: NaN).
    """

    def __init__(self, p: float, rescale: bool, dim: int) -> None:
        super().__init__()
        self.p, self.rescale, self.dim = float(p), bool(rescale), int(dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return t
        n = t.shape[self.dim]
        keep = (torch.rand(n, device=t.device) > self.p).to(t.dtype)
        if self.rescale:
            keep = keep / keep.mean().clamp_min(1.0 / n)  # the mean of a mask with a kept row is >= 1/n
        shape = [1] * t.dim()
        shape[self.dim] = n
        return t * keep.view(shape)

    def extra_repr(self) -> str:
        return f"p={self.p}, rescale={self.rescale}, dim={self.dim}"


def check_common(config: Any) -> None:
    """Check the fields LoHa and LoKr share (PEFT's ``LycorisConfig``); raise :class:`ConfigError` naming the field."""
    check_rank_alpha(config, "alpha")
    for name in ("rank_dropout", "module_dropout"):
        v = getattr(config, name)
        if not (_finite(v) and 0.0 <= v <= 1.0):
            raise ConfigError(f"{name} must be a probability in [0, 1], got {v!r}")
    if not isinstance(config.use_effective_conv2d, bool):
        raise ConfigError(f"use_effective_conv2d must be True or False, got {config.use_effective_conv2d!r}")


def check_lycoris_site(site: Site, name: str) -> str | None:
    """Why PEFT's LoHa/LoKr cannot adapt ``site`` (they have layers for nn.Linear, Conv1d and Conv2d only)."""
    if site.kind == "embedding":
        return (f"PEFT's {name} does not adapt embeddings (PEFT 0.21.2 has {name} layers for nn.Linear, nn.Conv1d and "
                "nn.Conv2d only); leave the embedding out of target_modules, or use LoRA there")
    if site.kind == "conv" and len(site.kernel_size) not in (1, 2):
        return f"{len(site.kernel_size)}-d convolution: PEFT's {name} adapts Conv1d and Conv2d only"
    if site.kind == "linear" and site.fan_in_fan_out:
        return (f"a weight stored [in, out] ({site.module_type}): PEFT's {name} adapts nn.Linear, not HF's Conv1D "
                "or a bare x @ W")
    return None


def rank_alpha(config: Any, site: Site) -> tuple[int, float]:
    """The site's ``(r, alpha)``: PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup, else the config's."""
    return (pattern_value(config.rank_pattern, site.name, config.r, "rank_pattern"),
            pattern_value(config.alpha_pattern, site.name, config.alpha, "alpha_pattern"))


def common_value(adapters: dict[str, AdapterModule], what: str, get) -> Any:
    """The one value of a config-wide field all the adapter's sites share (a PEFT config has one)."""
    values = {get(m) for m in adapters.values()}
    if len(values) > 1:
        raise AdapterFileError(f"the adapter's sites disagree on {what} ({sorted(values, key=repr)}); one PEFT config "
                               f"has one {what}")
    return values.pop()


def _eager(aten_op, *args, role: Role | None = None, label: str | None = None, **kwargs):
    """The eager twin of ``emit.op``: the formulas below run as graph nodes or on tensors (fold) alike."""
    return aten_op(*args, **kwargs)


def full_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


def apply_delta(emit: Emit, site: Site, delta: fx.Node, dtype: torch.dtype, base_dtype: torch.dtype) -> None:
    """Wire ΔW (a node in the weight's layout) into the call: the call reads ``W + ΔW`` where it reads its weight as
    a graph value and adapter and base share an fp32/fp64 dtype; else ``y + op(x, ΔW)`` (PEFT's form)."""
    call = emit.call
    if call.weight_node is not None and dtype == base_dtype and full_precision(dtype):
        weight = emit.op(aten.add.Tensor, emit.weight(), delta, role=Role.OUT, replaces=0,
                         label="adapted_weight")  # W + ΔW: the one matmul / conv applies both
        emit.replace_input(call.weight_node, weight)
        return
    x = call.input
    if dtype != base_dtype:
        x = emit.cast(x, dtype)
    if site.kind == "conv":  # ΔW sees the windows W sees: the base stride, padding, dilation and groups
        op = {1: aten.conv1d, 2: aten.conv2d}[len(site.kernel_size)]
        pad = site.padding if isinstance(site.padding, str) else list(site.padding)
        out = emit.op(op.padding if isinstance(pad, str) else op.default, x, delta, None, list(site.stride), pad,
                      list(site.dilation), site.groups, label="delta")  # [N, out, *spatial]
    else:
        out = emit.op(aten.linear.default, x, delta, label="delta")  # [..., out]
    add_to_output(emit, out, dtype, base_dtype)


def add_to_output(emit: Emit, delta_out: fx.Node, dtype: torch.dtype, base_dtype: torch.dtype) -> None:
    """``y + delta_out``, tagged ``OUT``; PEFT adds in the adapter's dtype and casts the sum back once."""
    y = emit.call.node
    if dtype != base_dtype:
        total = emit.op(aten.add.Tensor, y, delta_out, replaces=0, label="sum")
        out = emit.cast(total, base_dtype, role=Role.OUT, replaces=0)
    else:
        out = emit.op(aten.add.Tensor, y, delta_out, role=Role.OUT, replaces=0, label="out")
    emit.replace_output(out)


def swap_tensors(method: type[Method], adapter: AdapterModule, site: Site, config: Any,
                 tensors: dict[str, torch.Tensor]) -> None:
    """A hot-swap: same tensor shapes, new values and scaling (``alpha / r``); the code is unchanged."""
    have = {k: tuple(t.shape) for k, t in method.site_tensors(adapter, site).items()}
    want = {k: tuple(s) for k, s in method.site_shapes(config, site).items()}
    if have != want:
        raise AdapterFileError(f"{site.name}: the file's {method.display_name} tensors {want} do not fit the adapter's "
                               f"{have}; a hot-swap keeps shapes: use load_adapter")
    method.load_site_tensors(adapter, site, tensors)
    r, alpha = rank_alpha(config, site)
    adapter.r, adapter.alpha, adapter.scaling = r, alpha, alpha / r
    adapter.gate_changed(bool(adapter.gate))


# ------------------------------------------------------------------------------------------- LoHa itself


def _uses_cp(site: Site, use_effective_conv2d: bool) -> bool:
    """PEFT's choice of the CP form: asked for, on a conv whose kernel is not all ones."""
    return bool(use_effective_conv2d) and site.kind == "conv" and any(k != 1 for k in site.kernel_size)


def _shapes(site: Site, r: int, cp: bool) -> dict[str, tuple[int, ...]]:
    """The LoHa tensors of ``site`` at rank ``r`` (PEFT's ``create_adapter_parameters``)."""
    out, *rest = site.weight_shape  # [out, in/groups, *kernel]
    if cp:
        core = tuple(site.kernel_size) if len(site.kernel_size) == 2 else (site.kernel_size[0], 1)
        return {"hada_w1_a": (r, out), "hada_w1_b": (r, rest[0]), "hada_t1": (r, r, *core),
                "hada_w2_a": (r, out), "hada_w2_b": (r, rest[0]), "hada_t2": (r, r, *core)}
    fan_in = math.prod(rest)
    return {"hada_w1_a": (out, r), "hada_w1_b": (r, fan_in), "hada_w2_a": (out, r), "hada_w2_b": (r, fan_in)}


class LoHaAdapter(AdapterModule):
    """One LoHa adapter at one site: PEFT's tensors under PEFT's names, the run-time ``scale`` buffer (``alpha / r``
    while on, 0 while off or merged), and the training-only ``module_dropout`` / ``rank_dropout`` when asked for."""

    method = "loha"

    def __init__(self, site: Site, adapter_name: str, r: int, alpha: float, config: LoHaConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site.name, adapter_name)
        self.kind, self.weight_shape = site.kind, tuple(site.weight_shape)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.cp = _uses_cp(site, config.use_effective_conv2d)
        self.use_effective_conv2d = bool(config.use_effective_conv2d)  # the config's flag, written back on save
        self.rank_dropout_p, self.module_dropout_p = float(config.rank_dropout), float(config.module_dropout)
        shapes = _shapes(site, r, self.cp)
        self.tensor_names = tuple(shapes)
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))
        self.register_buffer("scale", torch.tensor(self.scaling, dtype=dtype, device=device), persistent=False)
        if self.module_dropout_p > 0:
            self.module_dropout = ModuleDropout(self.module_dropout_p)
        if self.rank_dropout_p > 0:  # PEFT always rescales LoHa's kept rows; the rows of ΔW are W1a's rows
            self.rank_dropout = RankDropout(self.rank_dropout_p, rescale=True, dim=1 if self.cp else 0)

    def gate_changed(self, on: bool) -> None:
        with torch.no_grad():
            self.scale.fill_(self.scaling if on else 0.0)

    def reset_parameters(self, init: bool) -> None:
        """PEFT's init: kaiming-uniform everywhere, but ``hada_w2_b`` zero when ``init`` (the identity at start)."""
        with torch.no_grad():
            for name in self.tensor_names:
                nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
            if init:
                nn.init.zeros_(self.hada_w2_b)

    def delta_weight(self) -> torch.Tensor:
        """The fp32 update ΔW, in the weight's shape, at the adapter's scaling (whether it is on or not)."""
        t = {n: getattr(self, n).detach().float() for n in self.tensor_names}
        w1a = t["hada_w1_a"] * self.scaling
        return hada_delta(_eager, w1a, t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t1"),
                          t.get("hada_t2"), self.weight_shape)


def hada_delta(op, w1a, w1b, w2a, w2b, t1, t2, shape: tuple[int, ...]):
    """ΔW from ``s·W1a`` (already scaled) and the other factors, reshaped to ``shape`` (the weight's).

    ``op(aten_op, *args, role=..., label=..., **kwargs)`` applies an aten op: as a graph node (``insert``) or on
    tensors (``fold``), so the graph and the fold compute one formula.
    """
    if t1 is not None:  # CP: core ⨯ Wb ⨯ Wa -> [out, in, kh, kw]
        w1 = op(aten.einsum.default, "ijkl,jr,ip->prkl", [t1, w1b, w1a], label="w1")
        w2 = op(aten.einsum.default, "ijkl,jr,ip->prkl", [t2, w2b, w2a], label="w2")
    else:
        w1 = op(aten.mm.default, w1a, w1b, label="w1")  # [out, in·k]
        w2 = op(aten.mm.default, w2a, w2b, label="w2")  # [out, in·k]
    delta = op(aten.mul.Tensor, w1, w2, label="delta_weight")  # ΔW = (s·W1a@W1b) ⊙ (W2a@W2b)
    if len(shape) != (4 if t1 is not None else 2):  # a conv's [out, in·k], or a Conv1d's CP [out, in, k, 1]
        delta = op(aten.reshape.default, delta, list(shape), label="delta_weight")  # -> the weight's [out, in, *k]
    return delta


class Lycoris(Method):
    """The hooks LoHa and LoKr share (PEFT's ``LycorisTuner``): site rules, pattern warnings, and ``build``."""

    adapter_cls: ClassVar[type[AdapterModule]] = AdapterModule

    @classmethod
    def check_site(cls, site: Site, config: Any) -> str | None:
        return check_lycoris_site(site, cls.display_name) or super().check_site(site, config)

    @classmethod
    def check_selection(cls, config: Any, sites: list[Site]) -> None:
        warn_unused_patterns(config, sites)

    @classmethod
    def build(cls, site: Site, config: Any, adapter_name: str, weight: torch.Tensor) -> AdapterModule:
        r, alpha = rank_alpha(config, site)
        adapter = cls.adapter_cls(site, adapter_name, r, alpha, config,
                                  adapter_dtype(weight, config.keep_base_dtype), weight.device)
        adapter.reset_parameters(config.init_weights)
        return adapter


@PeftRegistry.register("loha")
class LoHa(Lycoris):
    config_cls = LoHaConfig
    adapter_cls = LoHaAdapter
    display_name = "LoHa"
    color = ("#d0ebff", "#1864ab")
    site_kinds = frozenset({"linear", "conv"})
    spec_aliases = {"dropout": "rank_dropout", "init": "init_weights", "effective_conv2d": "use_effective_conv2d"}
    default_targets = Lora.default_targets  # PEFT's LoHa table is a copy of LoRA's
    peft_default_table = "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING"

    @classmethod
    def validate_config(cls, config: LoHaConfig) -> None:
        check_common(config)
        if not isinstance(config.init_weights, bool):
            raise ConfigError(f"init_weights must be True or False, got {config.init_weights!r}")

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: LoHaAdapter) -> None:
        dtype = adapter.hada_w1_a.dtype
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        t = {n: emit.param(n, Role.PARAM, label=n) for n in adapter.tensor_names}
        s = emit.param("scale", Role.SCALING, label="scaling")
        if hasattr(adapter, "module_dropout"):  # training: 0 with probability p for the whole call
            s = emit.module("module_dropout", s, role=Role.DROPOUT, label="module_dropout")
        w1a = emit.op(aten.mul.Tensor, t["hada_w1_a"], s, role=Role.SCALE, label="w1a_scaled")  # s·W1a
        if hasattr(adapter, "rank_dropout"):  # training: rows of ΔW (= rows of W1a) dropped
            w1a = emit.module("rank_dropout", w1a, role=Role.DROPOUT, label="rank_dropout")

        def op(aten_op, *args, role: Role = Role.COMPUTE, label: str | None = None, **kwargs) -> fx.Node:
            return emit.op(aten_op, *args, role=role, label=label, **kwargs)

        delta = hada_delta(op, w1a, t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t1"),
                           t.get("hada_t2"), adapter.weight_shape)
        apply_delta(emit, site, delta, dtype, base_dtype)

    @classmethod
    def fold(cls, adapter: LoHaAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + adapter.delta_weight(), bias

    @classmethod
    def unfold(cls, adapter: LoHaAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight - adapter.delta_weight(), bias

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: LoHaConfig, site: Site) -> dict[str, tuple[int, ...]]:
        r, _ = rank_alpha(config, site)
        return _shapes(site, r, _uses_cp(site, config.use_effective_conv2d))

    @classmethod
    def site_tensors(cls, adapter: LoHaAdapter, site: Site) -> dict[str, torch.Tensor]:
        return {n: getattr(adapter, n).detach() for n in adapter.tensor_names}

    @classmethod
    def load_site_tensors(cls, adapter: LoHaAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n in adapter.tensor_names:
                getattr(adapter, n).copy_(tensors[n])

    @classmethod
    def swap_in(cls, adapter: LoHaAdapter, site: Site, config: LoHaConfig, tensors: dict[str, torch.Tensor]) -> None:
        swap_tensors(cls, adapter, site, config, tensors)

    @classmethod
    def site_settings(cls, config: LoHaConfig, site: Site) -> dict[str, Any]:
        r, alpha = rank_alpha(config, site)
        return {"r": r, "alpha": alpha, "cp": _uses_cp(site, config.use_effective_conv2d)}

    @classmethod
    def adapter_settings(cls, adapter: LoHaAdapter) -> dict[str, Any]:
        return {"r": adapter.r, "alpha": adapter.alpha, "cp": adapter.cp}

    @classmethod
    def config_fields(cls, adapters: dict[str, LoHaAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        r = Counter(m.r for m in adapters.values()).most_common(1)[0][0]
        alpha = Counter(m.alpha for m in adapters.values()).most_common(1)[0][0]
        return {"r": r, "alpha": alpha, "rank_pattern": keys_for({n: m.r for n, m in adapters.items()}, r),
                "alpha_pattern": keys_for({n: m.alpha for n, m in adapters.items()}, alpha),
                "rank_dropout": common_value(adapters, "rank_dropout", lambda m: m.rank_dropout_p),
                "module_dropout": common_value(adapters, "module_dropout", lambda m: m.module_dropout_p),
                "use_effective_conv2d": common_value(adapters, "use_effective_conv2d",
                                                     lambda m: m.use_effective_conv2d),
                "init_weights": True, "layers_to_transform": None, "layers_pattern": None}
