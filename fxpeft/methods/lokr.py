"""LoKr: a Kronecker-product update, interchangeable with HF PEFT's ``LoKrConfig``. One file: config, sites, nodes,
fold, and PEFT's file format (the helpers it shares with LoHa, PEFT's ``lycoris_utils``, are in ``loha.py``).

Each dimension is split in two (PEFT's :func:`factorization`: ``out = a·b``, ``in = c·d``, near the square root, or
around ``decompose_factor``), and the update of the weight is (``s = alpha / r``)::

    ΔW = s · W1 ⊗ W2          W1 [a, c],  W2 [b, d]  (a conv's W2: [b, d, *kernel])

``W1`` is a full matrix, or ``W1a @ W1b`` with ``decompose_both`` when ``r < max(a, c) / 2``; ``W2`` is full when
``r >= max(b, d) / 2``, else ``W2a @ W2b``, or on a conv with ``use_effective_conv2d`` (kernel not all ones) the CP
form ``einsum("ijkl,ip,jr->prkl", t2, W2a, W2b)``. The scaling multiplies ``W1``.

**In the graph, a linear site never builds ΔW** (``[out, in]``). ``(W1 ⊗ W2) x`` is ``W1 · X · W2ᵀ`` with ``X`` the
input seen as ``[c, d]``: per token two small matmuls, ``x [M, c, d] -> linear(·, W2) [M, c, b] -> bmm(s·W1, ·)
[M, a, b]``, ``M·(c·d·b + a·c·b)`` multiplies instead of ``M·out·in`` (10x fewer for 512×512, whose factors are
16×16 and 32×32), exact up to rounding. A conv site builds ΔW (PEFT's ``make_kron``: ``torch.kron``) and is applied
as LoHa's is: the call reads ``W + ΔW`` where it can (see ``loha.py``), else ``y + conv(x, ΔW)``.

**Training only**, as in PEFT: ``module_dropout`` skips the adapter for a call with probability p; ``rank_dropout``
drops output rows of ΔW (on a linear site: the update's output features; on a conv: ΔW's rows), divided by the
kept fraction only with ``rank_dropout_scale``. Both are ``call_module`` nodes that ``train()``/``eval()`` switch.

PEFT quirk kept for file parity: on an ``nn.Conv1d`` with a full ``W2`` (``[b, d, k]``), PEFT's ``torch.kron`` of a
2-d ``W1`` and a 3-d ``W2`` treats ``W1`` as ``[1, a, c]``; the ``[b, a·d, c·k]`` result, reshaped to
``[out, in, k]``, is not ``W1 ⊗ W2`` laid out per output. fxpeft builds the same ΔW, so a file gives PEFT's outputs.

Sites: ``nn.Linear``, Conv1d and Conv2d (grouped too), as PEFT 0.21.2; embeddings, 3-d convolutions and weights
stored ``[in, out]`` are refused.

PEFT's file layout (keys ``base_model.model.<site>.lokr_w1`` ...)::

    lokr_w1 [a, c]            or  lokr_w1_a [a, r], lokr_w1_b [r, c]
    lokr_w2 [b, d(, *k)]      or  lokr_w2_a [b, r], lokr_w2_b [r, d·k]
                              or  lokr_t2 [r, r, kh, kw] ([r, r, k, 1] on a Conv1d), lokr_w2_a [r, b], lokr_w2_b [r, d]
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import ConfigError
from fxpeft.registry import AdapterModule, Emit, PeftConfigBase, PeftRegistry
from fxpeft.sites import Site
from fxpeft.tags import Role

from .loha import (
    ModuleDropout,
    RankDropout,
    _eager,
    add_to_output,
    apply_delta,
    Lycoris,
    check_common,
    common_value,
    rank_alpha,
    swap_tensors,
)
from .lora import Lora

__all__ = ["LoKrConfig", "LoKrAdapter", "LoKr", "factorization"]

aten = torch.ops.aten


@dataclass
class LoKrConfig(PeftConfigBase):
    """LoKr settings, with HF PEFT's field names and defaults.

    Args:
        r: rank of the factors that are decomposed (``W2`` when small enough, ``W1`` with ``decompose_both``).
        alpha: scaling numerator: the update is scaled by ``alpha / r``.
        rank_dropout: in training, the probability of dropping each output row of ΔW.
        module_dropout: in training, the probability of skipping the adapter for a whole call.
        use_effective_conv2d: ``W2`` in CP form on Conv1d/Conv2d sites whose kernel is not all ones.
        decompose_both: ``W1`` as ``W1a @ W1b`` too, when ``r < max(a, c) / 2``.
        decompose_factor: split each dimension around this factor (-1: near its square root).
        rank_dropout_scale: divide the kept rows by the kept fraction.
        init_weights: True (``W1`` zero: the identity at start), ``"lycoris"`` (``W2`` zero), or False (all random).
        rank_pattern, alpha_pattern: per-site overrides (PEFT's matching: ``(.*\\.)?pattern$``).

    Example:
        >>> from fxpeft import LoKrConfig
        >>> LoKrConfig(r=4, target_modules=["q_proj"]).peft_type
        'LOKR'
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS's) split of ``dimension`` into ``m · n``: ``(factor, dimension // factor)`` when ``factor``
    divides it, else the divisor pair nearest the square root with ``m <= factor`` (``m <= n``).

    Example:
        >>> factorization(512), factorization(1024), factorization(127), factorization(128, 4)
        ((16, 32), (32, 32), (1, 127), (4, 32))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


@dataclass(frozen=True)
class _Layout:
    """What PEFT builds at a site: ``out = a·b``, ``in = c·d``, which factors are full, the CP form, the shapes."""

    a: int
    b: int
    c: int
    d: int
    use_w1: bool
    use_w2: bool
    cp: bool
    shapes: dict[str, tuple[int, ...]]

    @property
    def settings(self) -> tuple:
        return (self.a, self.b, self.c, self.d, self.use_w1, self.use_w2, self.cp)


def _layout(site: Site, r: int, config: LoKrConfig) -> _Layout:
    """PEFT's ``update_layer`` + ``create_adapter_parameters`` for ``site`` at rank ``r``."""
    out, fan_in, *kernel = site.weight_shape  # [out, in/groups, *kernel]
    a, b = factorization(out, config.decompose_factor)
    c, d = factorization(fan_in, config.decompose_factor)
    use_w1 = not (config.decompose_both and r < max(a, c) / 2)
    use_w2 = not (r < max(b, d) / 2)
    cp = bool(config.use_effective_conv2d) and site.kind == "conv" and any(k != 1 for k in kernel) and not use_w2
    shapes = {"lokr_w1": (a, c)} if use_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    if use_w2:
        shapes["lokr_w2"] = (b, d, *kernel)
    elif cp:
        core = tuple(kernel) if len(kernel) == 2 else (kernel[0], 1)
        shapes.update({"lokr_t2": (r, r, *core), "lokr_w2_a": (r, b), "lokr_w2_b": (r, d)})
    else:
        shapes.update({"lokr_w2_a": (b, r), "lokr_w2_b": (r, d * math.prod(kernel))})
    return _Layout(a, b, c, d, use_w1, use_w2, cp, shapes)


class LoKrAdapter(AdapterModule):
    """One LoKr adapter at one site: PEFT's tensors under PEFT's names, the run-time ``scale`` buffer (``alpha / r``
    while on, 0 while off or merged), and the training-only ``module_dropout`` / ``rank_dropout`` when asked for."""

    method = "lokr"

    def __init__(self, site: Site, adapter_name: str, r: int, alpha: float, config: LoKrConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site.name, adapter_name)
        self.kind, self.weight_shape = site.kind, tuple(site.weight_shape)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.layout = _layout(site, r, config)
        self.tensor_names = tuple(self.layout.shapes)
        # the config's flags, written back on save
        self.flags = {"use_effective_conv2d": bool(config.use_effective_conv2d),
                      "decompose_both": bool(config.decompose_both), "decompose_factor": int(config.decompose_factor),
                      "rank_dropout": float(config.rank_dropout), "module_dropout": float(config.module_dropout),
                      "rank_dropout_scale": bool(config.rank_dropout_scale)}
        for name, shape in self.layout.shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))
        self.register_buffer("scale", torch.tensor(self.scaling, dtype=dtype, device=device), persistent=False)
        if config.module_dropout > 0:
            self.module_dropout = ModuleDropout(config.module_dropout)
        if config.rank_dropout > 0:  # a linear site's update is [..., out]; a conv's ΔW is [out, ...]
            self.rank_dropout = RankDropout(config.rank_dropout, config.rank_dropout_scale,
                                            dim=-1 if site.kind == "linear" else 0)

    def gate_changed(self, on: bool) -> None:
        with torch.no_grad():
            self.scale.fill_(self.scaling if on else 0.0)

    def reset_parameters(self, init: bool | str) -> None:
        """PEFT's inits: True zeroes ``W1`` (``W1a``), ``"lycoris"`` zeroes ``W2`` (``W2b``), False zeroes nothing;
        every other tensor is kaiming-uniform."""
        zero = {True: {"lokr_w1", "lokr_w1_a"}, "lycoris": {"lokr_w2", "lokr_w2_b"}}.get(init, set())
        with torch.no_grad():
            for name in self.tensor_names:
                p = getattr(self, name)
                nn.init.zeros_(p) if name in zero else nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """The fp32 update ΔW, in the weight's shape, at the adapter's scaling (whether it is on or not)."""
        t = {n: getattr(self, n).detach().float() for n in self.tensor_names}
        w1 = _w1(_eager, t) * self.scaling
        return _kron_delta(_eager, w1, _w2(_eager, t), self.layout, self.weight_shape)


def _w1(op, t: dict):
    """``W1 [a, c]``: full, or ``W1a @ W1b``."""
    return t["lokr_w1"] if "lokr_w1" in t else op(aten.mm.default, t["lokr_w1_a"], t["lokr_w1_b"], label="w1")


def _w2(op, t: dict):
    """``W2``: full (``[b, d(, *k)]``), CP (``[b, d, kh, kw]``), or ``W2a @ W2b`` (``[b, d·k]``)."""
    if "lokr_w2" in t:
        return t["lokr_w2"]
    if "lokr_t2" in t:
        return op(aten.einsum.default, "ijkl,ip,jr->prkl", [t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]], label="w2")
    return op(aten.mm.default, t["lokr_w2_a"], t["lokr_w2_b"], label="w2")


def _w2_dims(layout: _Layout, weight_shape: tuple[int, ...]) -> int:
    if layout.use_w2:
        return len(weight_shape)
    return 4 if layout.cp else 2


def _kron_delta(op, w1, w2, layout: _Layout, weight_shape: tuple[int, ...]):
    """PEFT's ``make_kron``: ``kron(s·W1, W2)`` (``W1`` as ``[a, c, 1, 1]`` against a 4-d ``W2``), reshaped to the
    weight's shape."""
    dims = _w2_dims(layout, weight_shape)
    if dims == 4:
        w1 = op(aten.reshape.default, w1, [layout.a, layout.c, 1, 1], label="w1_4d")
    if layout.cp:  # einsum's result may have odd strides (even on size-1 dims, where .contiguous() keeps them, and
        # torch.kron's views then fail: PEFT 0.21.2 raises on a Conv1d's CP form); a fresh dense copy
        w2 = op(aten.clone.default, w2, memory_format=torch.contiguous_format, label="w2")
    delta = op(aten.kron.default, w1, w2, label="kron")
    if dims != len(weight_shape) or dims == 3:  # [out, in·k]; a Conv1d's [out, in, k, 1]; PEFT's Conv1d quirk
        delta = op(aten.reshape.default, delta, list(weight_shape), label="delta_weight")
    return delta


@PeftRegistry.register("lokr")
class LoKr(Lycoris):
    config_cls = LoKrConfig
    adapter_cls = LoKrAdapter
    display_name = "LoKr"
    color = ("#fff3bf", "#e67700")
    site_kinds = frozenset({"linear", "conv"})
    spec_aliases = {"dropout": "rank_dropout", "init": "init_weights", "effective_conv2d": "use_effective_conv2d",
                    "factor": "decompose_factor"}
    default_targets = Lora.default_targets  # PEFT's LoKr table is a copy of LoRA's
    peft_default_table = "TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING"

    @classmethod
    def validate_config(cls, config: LoKrConfig) -> None:
        check_common(config)
        for name in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(config, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(config, name)!r}")
        f = config.decompose_factor
        if not (isinstance(f, int) and not isinstance(f, bool) and (f == -1 or f > 0)):
            raise ConfigError(f"decompose_factor must be -1 (near the square root) or a positive integer, got {f!r}")
        if config.init_weights not in (True, False, "lycoris") or isinstance(config.init_weights, int) and \
                not isinstance(config.init_weights, bool):
            raise ConfigError(f"init_weights must be True, False or 'lycoris', got {config.init_weights!r}")

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: LoKrAdapter) -> None:
        dtype = getattr(adapter, adapter.tensor_names[0]).dtype
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        t = {n: emit.param(n, Role.PARAM, label=n) for n in adapter.tensor_names}

        def op(aten_op, *args, role: Role = Role.COMPUTE, label: str | None = None, **kwargs) -> fx.Node:
            return emit.op(aten_op, *args, role=role, label=label, **kwargs)

        s = emit.param("scale", Role.SCALING, label="scaling")
        if hasattr(adapter, "module_dropout"):  # training: 0 with probability p for the whole call
            s = emit.module("module_dropout", s, role=Role.DROPOUT, label="module_dropout")
        w1 = op(aten.mul.Tensor, _w1(op, t), s, role=Role.SCALE, label="w1_scaled")  # s·W1 [a, c]
        w2 = _w2(op, t)
        if site.kind == "conv":
            delta = _kron_delta(op, w1, w2, adapter.layout, adapter.weight_shape)  # ΔW [out, in, *k]
            if hasattr(adapter, "rank_dropout"):  # training: rows of ΔW dropped
                delta = emit.module("rank_dropout", delta, role=Role.DROPOUT, label="rank_dropout")
            apply_delta(emit, site, delta, dtype, base_dtype)
            return
        # (s·W1 ⊗ W2) x without ΔW: x's features as [c, d], W2 on d, then s·W1 on c.
        lay, x, y = adapter.layout, emit.call.input, emit.call.node
        if dtype != base_dtype:
            x = emit.cast(x, dtype)
        xk = op(aten.reshape.default, x, [-1, lay.c, lay.d], label="x_cd")  # [M, c, d]
        h = op(aten.linear.default, xk, w2, label="w2_x")  # [M, c, b]
        rows = op(aten.sym_size.int, h, 0, label="tokens")
        w1 = op(aten.expand.default, w1, [rows, lay.a, lay.c], label="w1_rows")  # [M, a, c]: a view of s·W1
        h = op(aten.bmm.default, w1, h, label="kron_x")  # [M, a, b]
        delta = op(aten.view.default, h, op(aten.sym_size.default, y, label="out_shape"), label="delta")  # [..., out]
        if hasattr(adapter, "rank_dropout"):  # training: output features (ΔW's rows) dropped
            delta = emit.module("rank_dropout", delta, role=Role.DROPOUT, label="rank_dropout")
        add_to_output(emit, delta, dtype, base_dtype)

    @classmethod
    def fold(cls, adapter: LoKrAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + adapter.delta_weight(), bias

    @classmethod
    def unfold(cls, adapter: LoKrAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight - adapter.delta_weight(), bias

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: LoKrConfig, site: Site) -> dict[str, tuple[int, ...]]:
        r, _ = rank_alpha(config, site)
        return dict(_layout(site, r, config).shapes)

    @classmethod
    def site_tensors(cls, adapter: LoKrAdapter, site: Site) -> dict[str, torch.Tensor]:
        return {n: getattr(adapter, n).detach() for n in adapter.tensor_names}

    @classmethod
    def load_site_tensors(cls, adapter: LoKrAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n in adapter.tensor_names:
                getattr(adapter, n).copy_(tensors[n])

    @classmethod
    def swap_in(cls, adapter: LoKrAdapter, site: Site, config: LoKrConfig, tensors: dict[str, torch.Tensor]) -> None:
        swap_tensors(cls, adapter, site, config, tensors)

    @classmethod
    def site_settings(cls, config: LoKrConfig, site: Site) -> dict[str, Any]:
        r, alpha = rank_alpha(config, site)
        return {"r": r, "alpha": alpha, "layout": _layout(site, r, config).settings}

    @classmethod
    def adapter_settings(cls, adapter: LoKrAdapter) -> dict[str, Any]:
        return {"r": adapter.r, "alpha": adapter.alpha, "layout": adapter.layout.settings}

    @classmethod
    def config_fields(cls, adapters: dict[str, LoKrAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        r = Counter(m.r for m in adapters.values()).most_common(1)[0][0]
        alpha = Counter(m.alpha for m in adapters.values()).most_common(1)[0][0]
        flags = {k: common_value(adapters, k, lambda m, k=k: m.flags[k]) for k in next(iter(adapters.values())).flags}
        return {"r": r, "alpha": alpha, "rank_pattern": keys_for({n: m.r for n, m in adapters.items()}, r),
                "alpha_pattern": keys_for({n: m.alpha for n, m in adapters.items()}, alpha), **flags,
                "init_weights": True, "layers_to_transform": None, "layers_pattern": None}
