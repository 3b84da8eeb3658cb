"""MiSS: matrix shard sharing (PEFT's former "Bone"), interchangeable with HF PEFT's ``MissConfig``. One file: config,
sites, nodes, fold, and PEFT's file format.

One trained block is shared by every ``r``-wide shard of a linear's input. By ``init_weights``:

- ``True`` / ``False`` (MiSS): ``B [r, out]``; every input shard ``c`` adds the same ``Bᵀ``::

      ΔW[o, c·r + k] = B[k, o]            (the last shard cut to ``in``, where ``r`` does not divide it)

  so ``ΔW·x = S(x)·B``, ``S(x) = Σ_c x[c·r : (c+1)·r]`` (``x`` zero-padded to whole shards).
- ``"mini"``: ``B [r, mini_r]``, repeated along ``out`` (``B_full[:, o] = B[:, o mod mini_r]``), then as above.
- ``"bat"`` (block affine): ``B [out/r, r, r]``; each ``r×r`` block ``W[i, j]`` of the weight (``i`` over ``out/r``,
  ``j`` over ``in/r``) becomes ``W[i, j] · (I + B[i]) + B[i]``: a weight-dependent update, not a sum.

**In the graph**, MiSS and mini add ``S(dropout(x))·B`` to the call's output, as PEFT does (``tokens·(in + r·out)``:
in training far cheaper than building the ``[out, in]`` update, whose gradient needs the full ``gᵀx``);
``miss_dropout`` is a ``call_module`` on an ``nn.Dropout``, training only. ``"bat"`` rewrites the weight the call
reads, ``W' = W_blocks·(I + B) + B`` (one matmul as in the base model; the weight is read once). Where the call has
no weight value to replace (a ``call_module`` site) or the adapter is fp32 on a bf16/fp16 base, it adds
``linear(x, W' - W)``. Switching the adapter off zeroes ``B``: the output is the base's exactly. The merge folds
``W + ΔW`` (``W'`` for bat) exactly; bat's unmerge is PEFT's ``(W' - B)(I + B)⁻¹`` (a solve, in fp64).

Init (PEFT's): ``True``, ``"bat"`` and ``"mini"`` start at zero (exactly the base); ``False`` draws ``B [r, out]``
kaiming-uniform.

Sites: ``nn.Linear`` only, as PEFT 0.21.2 (``r <= in``; bat needs ``r`` to divide ``in`` and ``out``, mini
``mini_r`` to divide ``out``). HF ``Conv1D``, convs and embeddings are refused.

PEFT's file layout: ``base_model.model.<site>.miss_block`` (``[r, out]``, ``[r, mini_r]`` or ``[out/r, r, r]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import AdapterFileError, ConfigError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Site
from fxpeft.tags import Role

from .hra import rewrite_weight
from .loha import add_to_output, common_value
from .lora import Lora, _finite, adapter_dtype
from .oft import _eager

__all__ = ["MissConfig", "MissAdapter", "Miss", "miss_mode", "shard_sum", "bat_weight"]

aten = torch.ops.aten


@dataclass
class MissConfig(PeftConfigBase):
    """MiSS settings, with HF PEFT's field names and defaults.

    Args:
        r: the shard width (the block's rows); at most the site's ``in_features``.
        miss_dropout: dropout on the input of the MiSS / mini update (training only; bat ignores it, as PEFT).
        mini_r: the width of the block along ``out`` in ``"mini"`` mode (it must divide ``out_features``).
        init_weights: ``True`` (MiSS, zero init), ``False`` (MiSS, kaiming-uniform), ``"bat"`` (block affine,
            zero init) or ``"mini"`` (MiSS with a ``[r, mini_r]`` block repeated along ``out``, zero init).
        bias: PEFT's bias training; only ``"none"`` is supported (train biases with ``modules_to_save``).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as for every method.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(8, 4)))
        >>> gm = fxpeft.rewrite(gm, fxpeft.MissConfig(r=2, target_modules=["0"]))
        >>> x = torch.randn(2, 8); bool((gm(x) == gm.get_submodule("0")(x)).all())  # zero init: the base
        True
    """

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: bool | str = True
    bias: str = "none"


def miss_mode(init_weights: bool | str) -> str:
    """The layer's form for an ``init_weights`` value: ``"bat"``, ``"mini"`` or ``"miss"`` (True and False)."""
    return init_weights if init_weights in ("bat", "mini") else "miss"


def _block_shape(config: MissConfig, site: Site) -> tuple[int, ...]:
    mode, r, out = miss_mode(config.init_weights), int(config.r), site.out_features
    return {"bat": (out // r, r, r), "mini": (r, int(config.mini_r)), "miss": (r, out)}[mode]


def shard_sum(op, x, r: int, width: int):
    """``S(x)``: the sum of ``x``'s ``r``-wide shards of its last dimension (zero-padded to whole shards),
    ``[..., r]``."""
    n = -(-width // r)  # shards, the last one padded
    if n * r != width:
        x = op(aten.constant_pad_nd.default, x, [0, n * r - width], 0.0, label="x_padded")  # [..., n·r]
    shards = op(aten.unflatten.int, x, -1, [n, r], label="x_shards")  # [..., n, r]
    return op(aten.sum.dim_IntList, shards, [-2], label="shard_sum")  # [..., r]


def bat_weight(op, weight, block, eye, r: int, out_f: int, in_f: int, replaces: int | None):
    """Bat's ``W'``: each ``r×r`` block ``W[i, j]`` times ``(I + B[i])``, plus ``B[i]``. ``W`` is read once (a second
    reader would look like another call site sharing the weight); ``replaces`` tags the chain (``Role.OUT`` last)."""
    w = op(aten.reshape.default, weight, [out_f // r, r, in_f // r, r], label="weight_blocks", replaces=replaces)
    w = op(aten.permute.default, w, [2, 0, 1, 3], label="weight_blocks", replaces=replaces)  # [in/r, out/r, r, r]
    affine = op(aten.add.Tensor, eye, block, label="i_plus_block")  # I + B: [out/r, r, r]
    w = op(aten.matmul.default, w, affine, label="blocks_affine", replaces=replaces)  # W[i, j]·(I + B[i])
    w = op(aten.add.Tensor, w, block, label="blocks_shifted", replaces=replaces)  # + B[i]
    w = op(aten.permute.default, w, [1, 2, 0, 3], label="bat_weight", replaces=replaces)  # [out/r, r, in/r, r]
    return op(aten.reshape.default, w, [out_f, in_f], label="bat_weight", replaces=replaces,
              role=Role.OUT if replaces is not None else Role.COMPUTE)


class MissAdapter(AdapterModule):
    """One MiSS adapter at one site: PEFT's ``miss_block``, and its dropout when asked."""

    method = "miss"

    def __init__(self, site: Site, adapter_name: str, config: MissConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site.name, adapter_name)
        self.mode, self.r, self.mini_r = miss_mode(config.init_weights), int(config.r), int(config.mini_r)
        self.in_features, self.out_features = site.in_features, site.out_features
        self.dropout_p = float(config.miss_dropout)
        self.miss_block = nn.Parameter(torch.zeros(_block_shape(config, site), dtype=dtype, device=device))
        if self.mode == "bat":
            self.register_buffer("eye", torch.eye(self.r, dtype=dtype, device=device), persistent=False)
        elif self.dropout_p > 0:
            self.dropout = nn.Dropout(self.dropout_p)

    def reset_parameters(self, init: bool | str) -> None:
        """PEFT's init: zeros, or kaiming-uniform for ``init_weights=False``."""
        with torch.no_grad():
            if init is False:
                nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))
            else:
                self.miss_block.zero_()

    def full_block(self, block: torch.Tensor | None = None) -> torch.Tensor:
        """The MiSS / mini block over every output, ``[r, out]`` (mini's repeated ``out / mini_r`` times)."""
        b = self.miss_block.detach() if block is None else block
        return b.repeat(1, self.out_features // self.mini_r) if self.mode == "mini" else b

    def delta_weight(self) -> torch.Tensor:
        """MiSS / mini's ``ΔW [out, in]``: ``Bᵀ`` once per input shard, the last one cut to ``in``."""
        bt = self.full_block().t()  # [out, r]
        n = -(-self.in_features // self.r)
        return bt.repeat(1, n)[:, :self.in_features]  # [out, n·r] -> [out, in]


def _settings(config: MissConfig, site: Site) -> dict[str, Any]:
    return {"mode": miss_mode(config.init_weights), "r": int(config.r), "mini_r": int(config.mini_r),
            "miss_dropout": float(config.miss_dropout)}


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@PeftRegistry.register("miss")
class Miss(Method):
    config_cls = MissConfig
    display_name = "MiSS"
    color = ("#e6fcf5", "#087f5b")
    site_kinds = frozenset({"linear"})
    spec_aliases = {"dropout": "miss_dropout", "init": "init_weights"}
    default_targets = Lora.default_targets  # PEFT's MiSS table is a copy of LoRA's
    peft_default_table = "TRANSFORMERS_MODELS_TO_MISS_TARGET_MODULES_MAPPING"

    # ---------------------------------------------------------------------------------- config and sites
    @classmethod
    def validate_config(cls, config: MissConfig) -> None:
        if not _pos_int(config.r):
            raise ConfigError(f"r must be a positive integer (the shard width), got {config.r!r}")
        if not _pos_int(config.mini_r):
            raise ConfigError(f"mini_r must be a positive integer, got {config.mini_r!r}")
        if not (_finite(config.miss_dropout) and 0.0 <= config.miss_dropout < 1.0):
            raise ConfigError(f"miss_dropout must be a probability in [0, 1), got {config.miss_dropout!r}")
        if not (isinstance(config.init_weights, bool) or config.init_weights in ("bat", "mini")):
            raise ConfigError(f"init_weights must be True, False, 'bat' or 'mini', got {config.init_weights!r}")
        if config.bias != "none":
            raise ConfigError(f"bias={config.bias!r} is not supported with MiSS; use bias='none' and list the modules "
                              "whose bias should train in modules_to_save")

    @classmethod
    def check_site(cls, site: Site, config: MissConfig) -> str | None:
        if site.kind == "linear" and site.fan_in_fan_out:
            return (f"a weight stored [in, out] ({site.module_type}): PEFT's MiSS adapts nn.Linear only, not HF's "
                    "Conv1D or a bare x @ W")
        if (why := super().check_site(site, config)) is not None:
            return why
        r, mode = config.r, miss_mode(config.init_weights)
        if r > site.in_features:
            return f"r={r} is larger than in_features={site.in_features} (PEFT refuses it too); lower r"
        if mode == "bat" and (site.in_features % r or site.out_features % r):
            return (f"init_weights='bat' cuts the weight [{site.out_features}, {site.in_features}] into r x r blocks: "
                    f"r={r} must divide both")
        if mode == "mini" and site.out_features % config.mini_r:
            return f"init_weights='mini': mini_r={config.mini_r} must divide out_features={site.out_features}"
        return None

    @classmethod
    def build(cls, site: Site, config: MissConfig, adapter_name: str, weight: torch.Tensor) -> MissAdapter:
        adapter = MissAdapter(site, adapter_name, config, adapter_dtype(weight, config.keep_base_dtype), weight.device)
        adapter.reset_parameters(config.init_weights)
        return adapter

    # ---------------------------------------------------------------------------------- graph
    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: MissAdapter) -> None:
        def op(aten_op, *args, role: Role = Role.COMPUTE, label: str | None = None, replaces: int | None = None,
               **kwargs) -> fx.Node:
            return emit.op(aten_op, *args, role=role, label=label, replaces=replaces, **kwargs)

        dtype = adapter.miss_block.dtype
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        block = emit.param("miss_block", Role.PARAM, label="miss_block")
        block = op(aten.where.ScalarOther, emit.param("gate", Role.GATE, label="gate"), block, 0.0,
                   label="block_gated")  # off: B = 0, the base exactly
        if adapter.mode == "bat":
            cls._insert_bat(emit, op, site, adapter, block, dtype, base_dtype)
            return
        if adapter.mode == "mini":  # [r, mini_r] -> [r, out]
            block = op(aten.repeat.default, block, [1, adapter.out_features // adapter.mini_r], label="block_full")
        x = emit.call.input
        if dtype != base_dtype:
            x = emit.cast(x, dtype)
        if hasattr(adapter, "dropout"):
            x = emit.module("dropout", x, role=Role.DROPOUT, label="miss_dropout")
        s = shard_sum(op, x, adapter.r, adapter.in_features)  # [..., r]
        add_to_output(emit, op(aten.matmul.default, s, block, label="delta"), dtype, base_dtype)  # [..., out]

    @staticmethod
    def _insert_bat(emit: Emit, op, site: Site, adapter: MissAdapter, block: fx.Node, dtype: torch.dtype,
                    base_dtype: torch.dtype) -> None:
        eye = emit.param("eye", Role.PARAM, label="eye")
        out_f, in_f = adapter.out_features, adapter.in_features
        rewrite_weight(emit, site, dtype, base_dtype,
                       lambda w, replaces: bat_weight(op, w, block, eye, adapter.r, out_f, in_f, replaces))

    @classmethod
    def fold(cls, adapter: MissAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        if adapter.mode != "bat":
            return weight + adapter.delta_weight().to(weight.dtype), bias
        b = adapter.miss_block.detach().to(weight.dtype)
        eye = torch.eye(adapter.r, dtype=weight.dtype, device=weight.device)
        return bat_weight(_eager, weight, b, eye, adapter.r, adapter.out_features, adapter.in_features, None), bias

    @classmethod
    def unfold(cls, adapter: MissAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        if adapter.mode != "bat":
            return weight - adapter.delta_weight().to(weight.dtype), bias
        # PEFT's inverse: W = (W' - B)(I + B)⁻¹, per block, as a solve in fp64
        r, (out_f, in_f) = adapter.r, weight.shape
        b = adapter.miss_block.detach().double()  # [out/r, r, r]
        w = weight.double().reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)  # [in/r, out/r, r, r]
        eye = torch.eye(r, dtype=torch.float64, device=weight.device)
        w = torch.linalg.solve((eye + b).expand_as(w), w - b, left=False)  # X·(I + B) = W' - B
        return w.permute(1, 2, 0, 3).reshape(out_f, in_f).to(weight.dtype), bias

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: MissConfig, site: Site) -> dict[str, tuple[int, ...]]:
        return {"miss_block": _block_shape(config, site)}

    @classmethod
    def site_tensors(cls, adapter: MissAdapter, site: Site) -> dict[str, torch.Tensor]:
        return {"miss_block": adapter.miss_block.detach()}

    @classmethod
    def load_site_tensors(cls, adapter: MissAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            adapter.miss_block.copy_(tensors["miss_block"])

    @classmethod
    def swap_in(cls, adapter: MissAdapter, site: Site, config: MissConfig, tensors: dict[str, torch.Tensor]) -> None:
        if _settings(config, site) != cls.adapter_settings(adapter):
            raise AdapterFileError(f"{site.name}: the file's MiSS settings {_settings(config, site)} differ from the "
                                   f"adapter's {cls.adapter_settings(adapter)}; a hot-swap keeps the graph: use "
                                   "load_adapter")
        cls.load_site_tensors(adapter, site, tensors)

    @classmethod
    def site_settings(cls, config: MissConfig, site: Site) -> dict[str, Any]:
        return _settings(config, site)

    @classmethod
    def adapter_settings(cls, adapter: MissAdapter) -> dict[str, Any]:
        return {"mode": adapter.mode, "r": adapter.r, "mini_r": adapter.mini_r, "miss_dropout": adapter.dropout_p}

    @classmethod
    def config_fields(cls, adapters: dict[str, MissAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        mode = common_value(adapters, "init_weights", lambda m: m.mode)
        return {"r": common_value(adapters, "r", lambda m: m.r),
                "mini_r": common_value(adapters, "mini_r", lambda m: m.mini_r),
                "miss_dropout": common_value(adapters, "miss_dropout", lambda m: m.dropout_p),
                "init_weights": mode if mode != "miss" else True, "bias": "none",
                "layers_to_transform": None, "layers_pattern": None}
