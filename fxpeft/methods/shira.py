"""SHiRA: a sparse high-rank adapter, interchangeable with HF PEFT's ``ShiraConfig``. One file: config, sites, nodes,
fold, and PEFT's file format.

Each site trains ``n = r · (in + out)`` entries of its ``[out, in]`` weight (as many numbers as a rank-``r`` LoRA),
at fixed positions ``(rows, cols)``; the update is sparse but of high rank::

    W' = W,  with W'[rows[i], cols[i]] += w[i] · scale          (scale: 1, PEFT's fixed scaling)

The positions are PEFT's ``random_mask`` to the bit: the first ``n`` entries of ``torch.randperm(out·in)`` from a
CPU ``torch.Generator`` seeded with ``random_seed`` (PEFT's unseeded generator when None), read back row by row as
PEFT's ``torch.where(mask)`` does. They are saved in the file (``shira_indices``), so a loaded adapter uses the
file's positions, whatever mask made them.

**In the graph** the call reads ``index_put(W, (rows, cols), w · scale, accumulate=True)``: the base weight with the
trained values added at their positions (the ``scale`` buffer is 1 while on, 0 while off or merged), one matmul,
PEFT's form (it adds the dense ``sparse_coo_tensor`` to a copy of ``W``); on a bf16/fp16 base the values are cast
to the base dtype first, as PEFT's in-place add does. A ``call_module`` site (a symbolic_trace graph) adds
``linear(x, ΔW)`` to its output instead, ΔW the dense update.

Sites: ``nn.Linear``, as PEFT 0.21.2. Convolutions, embeddings and weights stored ``[in, out]`` (HF ``Conv1D``)
are refused. ``mask_type`` other than ``"random"`` (PEFT's custom ``mask_fn``, a Python function a config file
cannot carry) is refused.

PEFT's file layout::

    base_model.model.<site>.shira_weight    [n]        n = r · (in + out)
    base_model.model.<site>.shira_indices   [2, n]     int32 (row, column) positions
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxpeft.errors import AdapterFileError, ConfigError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Site
from fxpeft.tags import Role

from .loha import apply_delta, common_value
from .lora import Lora, adapter_dtype

__all__ = ["ShiraConfig", "ShiraAdapter", "Shira", "shira_random_indices"]

aten = torch.ops.aten

_W, _IDX = "shira_weight", "shira_indices"


@dataclass
class ShiraConfig(PeftConfigBase):
    """SHiRA settings, with HF PEFT's field names and defaults.

    Args:
        r: sizes the adapter like a rank-``r`` LoRA: ``r · (in + out)`` trained weight entries per site (the update
            itself is not of rank ``r``).
        mask_type: ``"random"`` (PEFT's only built-in mask); a custom ``mask_fn`` is refused.
        random_seed: the seed of the random mask (None: PEFT's unseeded generator, which is deterministic too).
        init_weights: True (zero: the identity at start) or False (standard normal values).
        fan_in_fan_out: accepted for PEFT compatibility; fxpeft reads the weight layout off the graph.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as for every method.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 3))),
        ...                     fxpeft.ShiraConfig(r=1, target_modules=["0"]))
        >>> [(n, tuple(p.shape)) for n, p in gm.named_parameters() if p.requires_grad]
        [('0.shira_default.weight', (7,))]
    """

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    init_weights: bool = True
    fan_in_fan_out: bool = False


def shira_random_indices(out_features: int, in_features: int, n: int, seed: int | None) -> torch.Tensor:
    """The ``[2, n]`` (row, column) positions of PEFT's ``random_mask`` for an ``[out, in]`` weight, in its order.

    Example:
        >>> from fxpeft.methods.shira import shira_random_indices
        >>> shira_random_indices(3, 4, 5, seed=0).shape
        torch.Size([2, 5])
    """
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:n]
    flat = flat.sort().values  # PEFT reads the positions back off a dense mask: row by row
    return torch.stack([flat // in_features, flat % in_features])  # flat k of [out, in] -> (k // in, k % in)


def _count(config: ShiraConfig, site: Site) -> int:
    return config.r * (site.in_features + site.out_features)


class ShiraAdapter(AdapterModule):
    """One SHiRA adapter at one site: the trained ``weight [n]``, its frozen ``rows`` / ``cols`` positions (saved as
    PEFT's ``shira_indices``), and the run-time ``scale`` buffer (1 while on, 0 while off or merged)."""

    method = "shira"

    def __init__(self, site: Site, adapter_name: str, config: ShiraConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site.name, adapter_name)
        self.r, self.in_features, self.out_features = config.r, site.in_features, site.out_features
        self.random_seed = config.random_seed
        n = _count(config, site)
        self.weight = nn.Parameter(torch.empty(n, dtype=dtype, device=device))
        idx = shira_random_indices(site.out_features, site.in_features, n, config.random_seed).to(device)
        self.register_buffer("rows", idx[0].clone(), persistent=False)
        self.register_buffer("cols", idx[1].clone(), persistent=False)
        self.register_buffer("scale", torch.ones((), dtype=dtype, device=device), persistent=False)

    def gate_changed(self, on: bool) -> None:
        with torch.no_grad():
            self.scale.fill_(1.0 if on else 0.0)

    def reset_parameters(self, init: bool) -> None:
        """PEFT's init: zero with ``init`` (the identity at start), else standard normal."""
        with torch.no_grad():
            n = self.weight.numel()
            self.weight.copy_(torch.zeros(n) if init else torch.randn(n))

    def delta_weight(self) -> torch.Tensor:
        """The fp32 dense update ``[out, in]``, at scale 1 (whether the adapter is on or not)."""
        delta = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        return delta.index_put_((self.rows, self.cols), self.weight.detach().float(), accumulate=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, n={self.weight.numel()}"


@PeftRegistry.register("shira")
class Shira(Method):
    config_cls = ShiraConfig
    display_name = "SHiRA"
    color = ("#ffe3e3", "#c92a2a")
    site_kinds = frozenset({"linear"})
    spec_aliases = {"init": "init_weights", "seed": "random_seed"}
    default_targets = Lora.default_targets  # PEFT's SHiRA table is LoRA's (phi aside)
    peft_default_table = "TRANSFORMERS_MODELS_TO_SHIRA_TARGET_MODULES_MAPPING"

    # ---------------------------------------------------------------------------------- config and sites
    @classmethod
    def validate_config(cls, config: ShiraConfig) -> None:
        if not (isinstance(config.r, int) and not isinstance(config.r, bool) and config.r > 0):
            raise ConfigError(f"r must be a positive integer, got {config.r!r}; set e.g. r=32")
        if config.mask_type != "random":
            raise ConfigError(f"mask_type={config.mask_type!r}: fxpeft implements SHiRA's 'random' mask only (a "
                              "custom mask_fn is a Python function no config file carries); use mask_type='random'")
        seed = config.random_seed
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2 ** 64):
            raise ConfigError(f"random_seed must be None or an integer in [0, 2**64) (a torch.Generator seed), got "
                              f"{seed!r}")
        for name in ("init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(config, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(config, name)!r}")

    @classmethod
    def check_site(cls, site: Site, config: ShiraConfig) -> str | None:
        if site.kind != "linear":
            what = "an embedding" if site.kind == "embedding" else f"a {site.kind}"
            return f"{what}: PEFT's SHiRA adapts nn.Linear only; leave it out of target_modules, or use LoRA there"
        if site.fan_in_fan_out:
            return (f"a weight stored [in, out] ({site.module_type}): PEFT's SHiRA adapts nn.Linear only, not HF's "
                    "Conv1D or a bare x @ W")
        return super().check_site(site, config)

    @classmethod
    def check_selection(cls, config: ShiraConfig, sites: list[Site]) -> None:
        for site in sites:
            n, size = _count(config, site), site.in_features * site.out_features
            if n > size:
                raise ConfigError(f"r={config.r} gives {site.name!r} r·(in + out) = {n} SHiRA weights, more than its "
                                  f"{site.out_features}x{site.in_features} = {size} entries; lower r")

    # ---------------------------------------------------------------------------------- graph
    @classmethod
    def build(cls, site: Site, config: ShiraConfig, adapter_name: str, weight: torch.Tensor) -> ShiraAdapter:
        adapter = ShiraAdapter(site, adapter_name, config, adapter_dtype(weight, config.keep_base_dtype),
                               weight.device)
        adapter.reset_parameters(config.init_weights)
        return adapter

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: ShiraAdapter) -> None:
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        values = emit.op(aten.mul.Tensor, emit.param("weight", label="shira_weight"),
                         emit.param("scale", Role.SCALING, label="scaling"), role=Role.SCALE,
                         label="shira_values")  # [n]
        if adapter.weight.dtype != base_dtype:  # PEFT adds the values into a copy of the base weight
            values = emit.cast(values, base_dtype)
        positions = [emit.param("rows", label="shira_rows"), emit.param("cols", label="shira_cols")]
        call = emit.call
        if call.weight_node is not None:  # the call reads W with the values added at their positions
            weight = emit.op(aten.index_put.default, emit.weight(), positions, values, True, role=Role.OUT,
                             replaces=0, label="adapted_weight")  # [out, in]
            emit.replace_input(call.weight_node, weight)
            return
        zeros = emit.op(aten.new_zeros.default, values, [site.out_features, site.in_features], label="delta_weight")
        delta = emit.op(aten.index_put.default, zeros, positions, values, True, label="delta_weight")  # [out, in]
        apply_delta(emit, site, delta, base_dtype, base_dtype)  # a call_module site: y + linear(x, ΔW)

    @classmethod
    def fold(cls, adapter: ShiraAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + adapter.delta_weight(), bias

    @classmethod
    def unfold(cls, adapter: ShiraAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight - adapter.delta_weight(), bias

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: ShiraConfig, site: Site) -> dict[str, tuple[int, ...]]:
        n = _count(config, site)
        return {_W: (n,), _IDX: (2, n)}

    @classmethod
    def site_tensors(cls, adapter: ShiraAdapter, site: Site) -> dict[str, torch.Tensor]:
        return {_W: adapter.weight.detach(), _IDX: torch.stack([adapter.rows, adapter.cols]).to(torch.int32)}

    @classmethod
    def load_site_tensors(cls, adapter: ShiraAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        idx = tensors[_IDX]
        if idx.is_floating_point():  # PEFT saves them as float32 on Windows
            idx = idx.round()
        idx = idx.to(torch.int64)
        if idx.numel() and (idx.min() < 0 or idx[0].max() >= site.out_features or idx[1].max() >= site.in_features):
            raise AdapterFileError(f"{site.name}: shira_indices fall outside its {site.out_features}x"
                                   f"{site.in_features} weight; the file is corrupt or for another model")
        with torch.no_grad():
            adapter.weight.copy_(tensors[_W])
            adapter.rows.copy_(idx[0]), adapter.cols.copy_(idx[1])

    @classmethod
    def swap_in(cls, adapter: ShiraAdapter, site: Site, config: ShiraConfig, tensors: dict[str, torch.Tensor]) -> None:
        if tuple(tensors[_W].shape) != tuple(adapter.weight.shape):
            raise AdapterFileError(f"{site.name}: the file's r={config.r} does not fit the adapter's r={adapter.r}; "
                                   "a hot-swap keeps shapes: use load_adapter")
        cls.load_site_tensors(adapter, site, tensors)  # values and positions: both are buffers of fixed shape

    @classmethod
    def site_settings(cls, config: ShiraConfig, site: Site) -> dict[str, Any]:
        return {"r": config.r}

    @classmethod
    def adapter_settings(cls, adapter: ShiraAdapter) -> dict[str, Any]:
        return {"r": adapter.r}

    @classmethod
    def config_fields(cls, adapters: dict[str, ShiraAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        return {"r": common_value(adapters, "r", lambda m: m.r), "mask_type": "random",
                "random_seed": common_value(adapters, "random_seed", lambda m: m.random_seed),
                "fan_in_fan_out": False, "init_weights": True}
