"""HRA: Householder reflection adaptation, interchangeable with HF PEFT's ``HRAConfig``. One file: config, sites,
nodes, fold, and PEFT's file format.

Each site trains ``r`` vectors ``u₁..u_r`` over its input dimension (a linear's ``in``, a conv's ``in·k·k``), and its
weight becomes the base weight times a chain of reflections::

    W' = W · H₁ · H₂ ··· H_r,     Hᵢ = I - 2 ûᵢ ûᵢᵀ,   ûᵢ = uᵢ / ‖uᵢ‖        (W seen as [out, in·k·k])

With ``apply_GS`` the vectors are first orthonormalised by Gram–Schmidt (``q₁..q_r``, in order, as PEFT does), and
the chain is one reflection across their span: ``W' = W · (I - 2 Q Qᵀ)``.

**In the graph** the call reads ``W'`` (one matmul or conv, as the base model runs): each reflection is one
``addmm`` on the weight, ``W ← W - 2 (W ûᵢ) ûᵢᵀ`` (``out·in`` per vector; PEFT builds ``∏Hᵢ [in, in]`` and
multiplies, ``in²·(r + out)``), and Gram–Schmidt is ``r(r-1)/2`` projections as nodes. The merge is exactly that
fold (PEFT's merge is ``W·∏Hᵢ``). Where a call has no weight value to replace (a ``call_module`` site of a
symbolic_trace graph) or the adapter is fp32 on a bf16/fp16 base, the graph adds ``op(x, W' - W)`` instead.
Switching the adapter off zeroes ``û`` (``Q``): every reflection is the identity and ``W' = W`` exactly.

**Init** (``init_weights=True``, PEFT's): ``r/2`` kaiming-uniform vectors, each repeated twice in a row; a reflection
twice is the identity, so the adapter starts as the identity up to rounding (not bit-exactly: ‖W'-W‖/‖W‖ ~ 1e-7).
With odd ``r`` PEFT warns and draws every vector at random (``init_weights=False``'s init): the adapter then starts
away from the identity. fxpeft does the same.

Sites: ``nn.Linear`` and square-kernel ``nn.Conv2d`` (groups 1, dilation 1), as PEFT 0.21.2. HF ``Conv1D``
(weights stored ``[in, out]``), embeddings, Conv1d/Conv3d, grouped or dilated convs are refused. PEFT's conv HRA
passes the base conv only ``stride[0]`` and ``padding[0]``: on a conv whose stride or padding differ per axis (or a
string padding) PEFT computes differently, and saving or loading warns (``differs_in_peft``).

PEFT's file layout: ``base_model.model.<site>.hra_u [in·k·k, r]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import AdapterFileError, ConfigError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Site
from fxpeft.tags import Role

from .loha import apply_delta, common_value, full_precision
from .lora import Lora, adapter_dtype
from .oft import _base_and_reader, _eager, _wire

__all__ = ["HRAConfig", "HRAAdapter", "HRA", "reflect_weight", "rewrite_weight"]

aten = torch.ops.aten


@dataclass
class HRAConfig(PeftConfigBase):
    """HRA settings, with HF PEFT's field names and defaults.

    Args:
        r: the number of Householder vectors per site (even, for the default init).
        apply_GS: orthonormalise the vectors (Gram–Schmidt) and reflect once across their span.
        init_weights: True (PEFT's symmetric init: pairs of equal vectors, the identity at start) or False
            (kaiming-uniform vectors).
        bias: PEFT's bias training; only ``"none"`` is supported (train biases with ``modules_to_save``).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as for every method.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(8, 4)))
        >>> gm = fxpeft.rewrite(gm, fxpeft.HRAConfig(r=2, target_modules=["0"]))
        >>> x = torch.randn(2, 8); torch.allclose(gm(x), gm.get_submodule("0")(x), atol=1e-6)  # pairs: identity
        True
    """

    r: int = 8
    apply_GS: bool = False
    init_weights: bool = True
    bias: str = "none"


def _reflected_dim(site: Site) -> int:
    """The features HRA reflects: a linear's ``in``, a conv's ``in·kh·kw``."""
    return math.prod(site.weight_shape[1:])


def unit_vectors(op, u, r: int, gram_schmidt: bool):
    """The vectors the reflections use, ``[dim, r]``: each column over its norm, or Gram–Schmidt's orthonormal
    columns (PEFT's order: column i minus its projections on the earlier ones, then normalised)."""
    if not gram_schmidt:
        norm = op(aten.linalg_vector_norm.default, u, 2, [0], True, label="u_norm")  # [1, r]
        return op(aten.div.Tensor, u, norm, label="u_unit")
    cols: list = []
    for i in range(r):
        v = op(aten.slice.Tensor, u, 1, i, i + 1, label="u_col")  # [dim, 1]
        for q in cols:
            coef = op(aten.mm.default, op(aten.t.default, q, label="q_t"), v, label="gs_coef")  # qᵀv: [1, 1]
            v = op(aten.sub.Tensor, v, op(aten.mul.Tensor, coef, q, label="gs_proj"), label="gs_rest")
        norm = op(aten.linalg_vector_norm.default, v, 2, None, False, label="gs_norm")
        cols.append(op(aten.div.Tensor, v, norm, label="gs_q"))
    return op(aten.cat.default, cols, 1, label="gs_basis")  # Q [dim, r]


def reflect_weight(op, weight, unit, r: int, gram_schmidt: bool, shape: list[int], replaces: int | None,
                   reverse: bool = False):
    """``W' = W·H₁···H_r`` (``W·(I - 2QQᵀ)`` with Gram–Schmidt), one ``addmm`` per reflection on ``W`` seen as
    ``[rows, dim]``; ``reverse`` applies the chain backwards (``W'·H_r···H₁``: the inverse, each ``Hᵢ`` being its
    own inverse). ``replaces`` tags the chain from ``weight`` to the result (``Role.OUT`` last)."""
    # The weight is read once, here: each reflection reads it twice (W and W·v), and a second reader would look like
    # another call site sharing the weight. A conv's [out, in, kh, kw] -> [out, in·kh·kw]; a linear's is a view.
    w = op(aten.reshape.default, weight, [shape[0], math.prod(shape[1:])], label="weight_2d", replaces=replaces)
    if gram_schmidt:
        steps = [unit]  # one reflection across span(Q)
    else:
        order = range(r - 1, -1, -1) if reverse else range(r)
        steps = [op(aten.slice.Tensor, unit, 1, i, i + 1, label="u_col") for i in order]  # each [dim, 1]
    out = Role.OUT if replaces is not None else Role.COMPUTE  # the chain's last node stands for the weight
    conv = len(shape) > 2
    for k, v in enumerate(steps):
        wv = op(aten.mm.default, w, v, label="weight_u")  # [rows, dim] @ [dim, k] -> [rows, k]
        last = k == len(steps) - 1 and not conv
        w = op(aten.addmm.default, w, wv, op(aten.t.default, v, label="u_t"), alpha=-2, label="reflected_weight",
               replaces=replaces, role=out if last else Role.COMPUTE)  # W - 2 (W v) vᵀ
    if conv:  # back to the weight's shape
        w = op(aten.reshape.default, w, shape, label="reflected_weight", replaces=replaces, role=out)
    return w


def rewrite_weight(emit: Emit, site: Site, dtype: torch.dtype, base_dtype: torch.dtype,
                   build: Callable[[fx.Node, int | None], fx.Node]) -> None:
    """Make the call read ``build(W)``, a weight-dependent rewrite of its weight (``build(w, replaces)`` tags its
    chain with ``replaces``). Where the call reads its weight as a graph value and adapter and base share an fp32/fp64
    dtype, the call reads it directly; else the graph adds ``op(x, build(W) - W)`` (:func:`apply_delta`)."""
    call = emit.call
    if call.weight_node is not None and dtype == base_dtype and full_precision(dtype):
        # Such rewrites do not commute: a later adapter rewrites the weight the call reads now (earlier adapters'
        # included), the order the merge folds them in.
        current = next((arg for arg in call.node.all_input_nodes
                        if _base_and_reader(arg, site)[0] is call.weight_node), None)
        weight = build(current or emit.weight(), 0)
        if current is None:  # the call reads a transpose of W: rewrite W itself
            emit.replace_input(call.weight_node, weight)
        else:
            _wire(emit, current, weight, reader=None)
        return
    w = emit.weight(own=True)  # read beside the call, not in its place: not a second call site of the weight
    if dtype != base_dtype:
        w = emit.cast(w, dtype)
    delta = emit.op(aten.sub.Tensor, build(w, None), w, label="delta_weight")
    apply_delta(emit, site, delta, dtype, base_dtype)


class HRAAdapter(AdapterModule):
    """One HRA adapter at one site: PEFT's ``hra_u [in·k·k, r]``."""

    method = "hra"

    def __init__(self, site: Site, adapter_name: str, config: HRAConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site.name, adapter_name)
        self.kind, self.weight_shape = site.kind, tuple(site.weight_shape)
        self.r, self.apply_GS = int(config.r), bool(config.apply_GS)
        self.hra_u = nn.Parameter(torch.empty(_reflected_dim(site), self.r, dtype=dtype, device=device))

    def reset_parameters(self, init: bool) -> None:
        """PEFT's init: ``r/2`` kaiming-uniform vectors, each twice in a row (the identity at start), or ``r`` of
        them (``init_weights=False``, or an odd ``r``)."""
        with torch.no_grad():
            if init and self.r % 2 == 0:
                half = torch.empty(self.hra_u.shape[0], self.r // 2, dtype=self.hra_u.dtype, device=self.hra_u.device)
                nn.init.kaiming_uniform_(half, a=math.sqrt(5))
                self.hra_u.copy_(torch.repeat_interleave(half, 2, dim=1))  # [dim, r/2] -> [dim, r]: u₁,u₁,u₂,u₂..
            else:
                nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))

    def reflect(self, weight: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """``weight`` (the site's shape) through this adapter's reflections, in ``weight``'s dtype; ``reverse``:
        the inverse. Reads the parameter whether the adapter is on or not."""
        u = self.hra_u.detach().to(weight.dtype)
        unit = unit_vectors(_eager, u, self.r, self.apply_GS)
        return reflect_weight(_eager, weight, unit, self.r, self.apply_GS, list(weight.shape), None, reverse)


def _settings(config: HRAConfig, site: Site) -> dict[str, Any]:
    return {"r": int(config.r), "apply_GS": bool(config.apply_GS)}


@PeftRegistry.register("hra")
class HRA(Method):
    config_cls = HRAConfig
    display_name = "HRA"
    color = ("#fff3bf", "#e67700")
    site_kinds = frozenset({"linear", "conv"})
    spec_aliases = {"gs": "apply_GS", "init": "init_weights"}
    default_targets = Lora.default_targets  # PEFT's HRA table is a copy of LoRA's
    peft_default_table = "TRANSFORMERS_MODELS_TO_HRA_TARGET_MODULES_MAPPING"

    # ---------------------------------------------------------------------------------- config and sites
    @classmethod
    def validate_config(cls, config: HRAConfig) -> None:
        r = config.r
        if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
            raise ConfigError(f"r must be a positive integer (the number of Householder vectors), got {r!r}")
        for name in ("apply_GS", "init_weights"):
            if not isinstance(getattr(config, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(config, name)!r}")
        if config.bias != "none":
            raise ConfigError(f"bias={config.bias!r} is not supported with HRA; use bias='none' and list the modules "
                              "whose bias should train in modules_to_save")

    @classmethod
    def check_site(cls, site: Site, config: HRAConfig) -> str | None:
        if site.kind == "linear" and site.fan_in_fan_out:
            return (f"a weight stored [in, out] ({site.module_type}): PEFT's HRA adapts nn.Linear and nn.Conv2d, "
                    "not HF's Conv1D or a bare x @ W")
        if site.kind == "conv":
            k = tuple(site.kernel_size)
            if len(k) != 2:
                return f"{len(k)}-d convolution: PEFT's HRA adapts Conv2d only"
            if site.groups != 1:
                return f"grouped convolution (groups={site.groups}) is not supported by HRA (PEFT's neither)"
            if any(d != 1 for d in site.dilation or ()):
                return f"dilated convolution (dilation={tuple(site.dilation)}): PEFT's HRA conv ignores dilation"
            if k[0] != k[1]:
                return f"non-square kernel {k}: PEFT's HRA sizes its vectors in·k·k for kh == kw"
        if config.apply_GS and config.r > _reflected_dim(site):
            return (f"apply_GS with r={config.r} > the {_reflected_dim(site)} features it reflects: Gram–Schmidt "
                    "cannot find that many orthonormal vectors; lower r")
        return super().check_site(site, config)

    @classmethod
    def check_selection(cls, config: HRAConfig, sites: list[Site]) -> None:
        if config.init_weights and config.r % 2 and sites:
            warnings.warn(f"HRA's symmetric init needs an even r (got r={config.r}): as PEFT, the vectors are drawn "
                          "at random and the adapter does not start as the identity")

    @classmethod
    def differs_in_peft(cls, site: Site) -> str | None:
        if site.kind == "conv" and (isinstance(site.padding, str) or len(set(site.padding or (0,))) > 1
                                    or len(set(site.stride or (1,))) > 1):
            return (f"conv HRA on {site.name}: PEFT 0.21 runs the conv with stride[0] and padding[0] only "
                    f"(stride={site.stride}, padding={site.padding}); fxpeft keeps the conv's own")
        return None

    @classmethod
    def build(cls, site: Site, config: HRAConfig, adapter_name: str, weight: torch.Tensor) -> HRAAdapter:
        adapter = HRAAdapter(site, adapter_name, config, adapter_dtype(weight, config.keep_base_dtype), weight.device)
        adapter.reset_parameters(config.init_weights)
        return adapter

    # ---------------------------------------------------------------------------------- graph
    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: HRAAdapter) -> None:
        def op(aten_op, *args, role: Role = Role.COMPUTE, label: str | None = None, replaces: int | None = None,
               **kwargs) -> fx.Node:
            return emit.op(aten_op, *args, role=role, label=label, replaces=replaces, **kwargs)

        dtype = adapter.hra_u.dtype
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        u = emit.param("hra_u", Role.PARAM, label="hra_u")
        unit = unit_vectors(op, u, adapter.r, adapter.apply_GS)
        # off: û = 0, each reflection W - 2(W·0)0ᵀ is W exactly (and a NaN from a zero vector cannot leak)
        unit = op(aten.where.ScalarOther, emit.param("gate", Role.GATE, label="gate"), unit, 0.0, label="u_gated")
        shape = list(site.weight_shape)
        rewrite_weight(emit, site, dtype, base_dtype,
                       lambda w, replaces: reflect_weight(op, w, unit, adapter.r, adapter.apply_GS, shape, replaces))

    @classmethod
    def fold(cls, adapter: HRAAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return adapter.reflect(weight), bias

    @classmethod
    def unfold(cls, adapter: HRAAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        # each reflection is its own inverse: the chain backwards, in fp64 (Gram–Schmidt's Q is orthonormal only
        # up to rounding)
        return adapter.reflect(weight.double(), reverse=True).to(weight.dtype), bias

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: HRAConfig, site: Site) -> dict[str, tuple[int, ...]]:
        return {"hra_u": (_reflected_dim(site), int(config.r))}

    @classmethod
    def site_tensors(cls, adapter: HRAAdapter, site: Site) -> dict[str, torch.Tensor]:
        return {"hra_u": adapter.hra_u.detach()}

    @classmethod
    def load_site_tensors(cls, adapter: HRAAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            adapter.hra_u.copy_(tensors["hra_u"])

    @classmethod
    def swap_in(cls, adapter: HRAAdapter, site: Site, config: HRAConfig, tensors: dict[str, torch.Tensor]) -> None:
        if _settings(config, site) != cls.adapter_settings(adapter):
            raise AdapterFileError(f"{site.name}: the file's HRA settings {_settings(config, site)} differ from the "
                                   f"adapter's {cls.adapter_settings(adapter)}; a hot-swap keeps the graph: use "
                                   "load_adapter")
        cls.load_site_tensors(adapter, site, tensors)

    @classmethod
    def site_settings(cls, config: HRAConfig, site: Site) -> dict[str, Any]:
        return _settings(config, site)

    @classmethod
    def adapter_settings(cls, adapter: HRAAdapter) -> dict[str, Any]:
        return {"r": adapter.r, "apply_GS": adapter.apply_GS}

    @classmethod
    def config_fields(cls, adapters: dict[str, HRAAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        return {"r": common_value(adapters, "r", lambda m: m.r),
                "apply_GS": common_value(adapters, "apply_GS", lambda m: m.apply_GS),
                "init_weights": True, "bias": "none", "layers_to_transform": None, "layers_pattern": None}
