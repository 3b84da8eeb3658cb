"""FourierFT: a weight update learned as a few Fourier coefficients, interchangeable with HF PEFT's
``FourierFTConfig``. One file: config, sites, nodes, fold, and PEFT's file format.

Each site trains ``n`` spectral coefficients ``c [n]`` placed at ``n`` fixed frequencies ``(rows, cols)`` of an
``[out, in]`` spectrum, the rest zero; the update is the real part of its 2-d inverse DFT::

    ΔW = real(ifft2(F)) · scaling        F [out, in]: zeros, with F[rows[i], cols[i]] = c[i]

The frequencies are PEFT's to the bit: the first ``n`` entries of ``torch.randperm(out·in)`` drawn from a CPU
``torch.Generator`` seeded with ``random_loc_seed``, each flat index ``k`` giving ``(k // in, k % in)``. They are
frozen buffers, never saved (the seed regenerates them), as in PEFT.

**In the graph** ΔW is built on every call, as PEFT does (its cost does not grow with the batch): ``new_zeros``,
``index_put`` of the coefficients, ``fft_ifft2``, ``real``, and the run-time ``scale`` buffer (``scaling`` while on,
0 while off or merged). PEFT computes the transform in fp32 whatever the adapter's dtype; so does the graph. Then,
where the call reads its weight as a graph value and the adapter shares the base's fp32/fp64 dtype, the call reads
``W + ΔW`` (one matmul, :func:`fxpeft.methods.loha.apply_delta`; ΔW transposed first for a weight stored
``[in, out]``); elsewhere the graph adds ``linear(x, ΔW)`` to the output, PEFT's form.

Sites: ``nn.Linear`` and weights stored ``[in, out]`` (HF ``Conv1D``), as PEFT 0.21.2; convolutions and embeddings
are refused (PEFT's FourierFT has no layer for them).

PEFT's file layout::

    base_model.model.<site>.fourierft_spectrum   [n_frequency]
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import AdapterFileError, ConfigError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Site
from fxpeft.tags import Role
from fxpeft.untrusted import pattern_key_match

from .loha import apply_delta, common_value, full_precision
from .lora import Lora, _finite, adapter_dtype, pattern_value

__all__ = ["FourierFTConfig", "FourierFTAdapter", "FourierFT", "spectral_indices"]

aten = torch.ops.aten

_KEY = "fourierft_spectrum"


@dataclass
class FourierFTConfig(PeftConfigBase):
    """FourierFT settings, with HF PEFT's field names and defaults.

    Args:
        n_frequency: the number of trained spectral coefficients per site (at most ``in · out``).
        scaling: the factor on ``real(ifft2(F))`` (PEFT's default 150, a learning-rate-like knob).
        random_loc_seed: the seed of the frequencies (PEFT's generator: the same seed gives PEFT's frequencies).
        init_weights: False (PEFT's default: the coefficients are standard normal, the adapter changes the outputs
            from the start) or True (zero: the identity at start).
        n_frequency_pattern: ``{pattern: n_frequency}`` overrides per site.
        fan_in_fan_out: accepted for PEFT compatibility; fxpeft reads the weight layout off the graph.
        bias: ``"none"``; ``"all"`` trains every base bias, ``"fourier_only"`` the adapted sites' biases, each as a
            per-adapter copy (:mod:`fxpeft.copies`).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as for every method.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 3))),
        ...                     fxpeft.FourierFTConfig(n_frequency=5, target_modules=["0"]))
        >>> [(n, tuple(p.shape)) for n, p in gm.named_parameters() if p.requires_grad]
        [('0.fourierft_default.spectrum', (5,))]
    """

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    bias: str = "none"
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool = False


def spectral_indices(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """The ``[2, n]`` (row, column) frequencies PEFT draws for an ``[out, in]`` weight with ``random_loc_seed=seed``.

    Example:
        >>> from fxpeft.methods.fourierft import spectral_indices
        >>> idx = spectral_indices(3, 4, 5, seed=777)
        >>> tuple(idx.shape), bool((idx[0] < 3).all() and (idx[1] < 4).all())
        ((2, 5), True)
    """
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features])  # flat k of [out, in] -> (k // in, k % in)


def _n_frequency(config: FourierFTConfig, site: Site) -> int:
    return pattern_value(config.n_frequency_pattern, site.name, config.n_frequency, "n_frequency_pattern")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


class FourierFTAdapter(AdapterModule):
    """One FourierFT adapter at one site: the trained ``spectrum [n]``, the frozen ``rows`` / ``cols`` frequency
    buffers (regenerated from the seed, never saved), and the run-time ``scale`` buffer (``scaling`` while on, 0 while
    off or merged)."""

    method = "fourierft"

    def __init__(self, site: Site, adapter_name: str, n: int, config: FourierFTConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site.name, adapter_name)
        self.in_features, self.out_features = site.in_features, site.out_features
        self.fan_in_fan_out = site.fan_in_fan_out  # ΔW is [out, in]; the fold transposes it for an [in, out] weight
        self.n_frequency, self.scaling, self.random_loc_seed = n, float(config.scaling), config.random_loc_seed
        self.spectrum = nn.Parameter(torch.empty(n, dtype=dtype, device=device))
        idx = spectral_indices(site.out_features, site.in_features, n, config.random_loc_seed).to(device)
        self.register_buffer("rows", idx[0].clone(), persistent=False)
        self.register_buffer("cols", idx[1].clone(), persistent=False)
        self.register_buffer("scale", torch.tensor(self.scaling, dtype=torch.float32, device=device), persistent=False)

    def gate_changed(self, on: bool) -> None:
        with torch.no_grad():
            self.scale.fill_(self.scaling if on else 0.0)

    def reset_parameters(self, init: bool) -> None:
        """PEFT's init: standard normal coefficients, or zero with ``init`` (the identity at start)."""
        with torch.no_grad():
            self.spectrum.copy_(torch.zeros(self.n_frequency) if init else torch.randn(self.n_frequency))

    def delta_weight(self) -> torch.Tensor:
        """The fp32 update ΔW in the weight's stored layout, at the adapter's scaling (whether it is on or not)."""
        dense = self.spectrum.new_zeros((self.out_features, self.in_features), dtype=torch.float32)
        dense[self.rows, self.cols] = self.spectrum.detach().float()
        delta = torch.fft.ifft2(dense).real * self.scaling  # [out, in]
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_frequency={self.n_frequency}, scaling={self.scaling}"


@PeftRegistry.register("fourierft")
class FourierFT(Method):
    config_cls = FourierFTConfig
    display_name = "FourierFT"
    color = ("#fff3bf", "#e67700")
    site_kinds = frozenset({"linear"})
    spec_aliases = {"n": "n_frequency", "init": "init_weights", "seed": "random_loc_seed"}
    default_targets = {**Lora.default_targets, "gpt2": ["mlp.c_proj"]}  # PEFT's table: LoRA's, GPT-2 changed
    peft_default_table = "TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING"

    # ---------------------------------------------------------------------------------- config and sites
    @classmethod
    def validate_config(cls, config: FourierFTConfig) -> None:
        if not _positive_int(config.n_frequency):
            raise ConfigError(f"n_frequency must be a positive integer, got {config.n_frequency!r}; set e.g. 1000")
        if not isinstance(config.n_frequency_pattern, dict) or not all(
                _positive_int(v) for v in config.n_frequency_pattern.values()):
            raise ConfigError(f"n_frequency_pattern must map patterns to positive integers, got "
                              f"{config.n_frequency_pattern!r}")
        if not _finite(config.scaling):
            raise ConfigError(f"scaling must be a finite number, got {config.scaling!r}")
        seed = config.random_loc_seed
        if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2 ** 64):
            raise ConfigError(f"random_loc_seed must be an integer in [0, 2**64) (a torch.Generator seed), got "
                              f"{seed!r}; PEFT draws the frequencies from it")
        for name in ("init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(config, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(config, name)!r}")
        if config.bias not in ("none", "all", "fourier_only"):
            raise ConfigError(f"bias={config.bias!r} is not supported; use 'none', 'all' or 'fourier_only'")

    @classmethod
    def check_site(cls, site: Site, config: FourierFTConfig) -> str | None:
        if site.kind != "linear":
            what = "an embedding" if site.kind == "embedding" else f"a {site.kind}"
            return (f"{what}: PEFT's FourierFT adapts nn.Linear and HF Conv1D only; leave it out of target_modules, "
                    "or use LoRA there")
        return super().check_site(site, config)

    @classmethod
    def check_selection(cls, config: FourierFTConfig, sites: list[Site]) -> None:
        for site in sites:
            n, size = _n_frequency(config, site), site.in_features * site.out_features
            if n > size:
                raise ConfigError(f"n_frequency={n} for {site.name!r} exceeds its {site.out_features}x"
                                  f"{site.in_features} = {size} frequencies; lower n_frequency (or set "
                                  "n_frequency_pattern for that site)")
        for key in config.n_frequency_pattern:
            if not any(pattern_key_match(str(key), s.name, field="n_frequency_pattern") for s in sites):
                warnings.warn(f"n_frequency_pattern key {key!r} matches none of the {len(sites)} targeted sites; it "
                              "has no effect")

    # ---------------------------------------------------------------------------------- graph
    @classmethod
    def build(cls, site: Site, config: FourierFTConfig, adapter_name: str, weight: torch.Tensor) -> FourierFTAdapter:
        adapter = FourierFTAdapter(site, adapter_name, _n_frequency(config, site), config,
                                   adapter_dtype(weight, config.keep_base_dtype), weight.device)
        adapter.reset_parameters(config.init_weights)
        return adapter

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: FourierFTAdapter) -> None:
        dtype = adapter.spectrum.dtype
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        c = emit.param("spectrum", Role.PARAM, label="spectrum")
        if dtype != torch.float32:  # PEFT's transform runs in fp32 whatever the adapter's dtype
            c = emit.cast(c, torch.float32)
        dense = emit.op(aten.new_zeros.default, c, [site.out_features, site.in_features],
                        label="spectrum_zeros")  # [out, in]
        dense = emit.op(aten.index_put.default, dense, [emit.param("rows", label="freq_rows"),
                                                        emit.param("cols", label="freq_cols")], c,
                        label="dense_spectrum")  # F[rows[i], cols[i]] = c[i]
        spatial = emit.op(aten.fft_ifft2.default, dense, label="ifft2")  # complex [out, in]
        delta = emit.op(aten.real.default, spatial, label="ifft2_real")
        delta = emit.op(aten.mul.Tensor, delta, emit.param("scale", Role.SCALING, label="scaling"), role=Role.SCALE,
                        label="delta_weight")  # ΔW [out, in]
        if dtype != torch.float32:
            delta = emit.cast(delta, dtype)
        apply_delta(emit, site, _in_layout(emit, site, delta, dtype, base_dtype), dtype, base_dtype)

    @classmethod
    def fold(cls, adapter: FourierFTAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + adapter.delta_weight(), bias

    @classmethod
    def unfold(cls, adapter: FourierFTAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight - adapter.delta_weight(), bias

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: FourierFTConfig, site: Site) -> dict[str, tuple[int, ...]]:
        return {_KEY: (_n_frequency(config, site),)}

    @classmethod
    def site_tensors(cls, adapter: FourierFTAdapter, site: Site) -> dict[str, torch.Tensor]:
        return {_KEY: adapter.spectrum.detach()}

    @classmethod
    def load_site_tensors(cls, adapter: FourierFTAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            adapter.spectrum.copy_(tensors[_KEY])

    @classmethod
    def swap_in(cls, adapter: FourierFTAdapter, site: Site, config: FourierFTConfig,
                tensors: dict[str, torch.Tensor]) -> None:
        """A hot-swap: same frequencies (seed and count), new coefficients and scaling; the code is unchanged."""
        n = _n_frequency(config, site)
        if config.random_loc_seed != adapter.random_loc_seed or n != adapter.n_frequency:
            raise AdapterFileError(f"{site.name}: the file's frequencies (random_loc_seed={config.random_loc_seed}, "
                                   f"n_frequency={n}) are not the adapter's ({adapter.random_loc_seed}, "
                                   f"{adapter.n_frequency}); a hot-swap keeps them: use load_adapter")
        cls.load_site_tensors(adapter, site, tensors)
        adapter.scaling = float(config.scaling)
        adapter.gate_changed(bool(adapter.gate))

    @classmethod
    def site_settings(cls, config: FourierFTConfig, site: Site) -> dict[str, Any]:
        return {"n_frequency": _n_frequency(config, site), "scaling": float(config.scaling),
                "seed": config.random_loc_seed}

    @classmethod
    def adapter_settings(cls, adapter: FourierFTAdapter) -> dict[str, Any]:
        return {"n_frequency": adapter.n_frequency, "scaling": adapter.scaling, "seed": adapter.random_loc_seed}

    @classmethod
    def config_fields(cls, adapters: dict[str, FourierFTAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        n = Counter(m.n_frequency for m in adapters.values()).most_common(1)[0][0]
        return {"n_frequency": n, "n_frequency_pattern": keys_for({k: m.n_frequency for k, m in adapters.items()}, n),
                "scaling": common_value(adapters, "scaling", lambda m: m.scaling),
                "random_loc_seed": common_value(adapters, "random_loc_seed", lambda m: m.random_loc_seed),
                "fan_in_fan_out": any(sites[k].fan_in_fan_out for k in adapters), "bias": "none",
                "init_weights": False, "layers_to_transform": None, "layers_pattern": None}


def _in_layout(emit: Emit, site: Site, delta: fx.Node, dtype: torch.dtype, base_dtype: torch.dtype) -> fx.Node:
    """ΔW ``[out, in]`` as :func:`apply_delta` wants it: the weight's own layout where the call reads ``W + ΔW``
    (``[in, out]`` for a weight stored so), else ``[out, in]`` for its ``linear(x, ΔW)``."""
    reads_weight = emit.call.weight_node is not None and dtype == base_dtype and full_precision(dtype)
    if reads_weight and site.fan_in_fan_out:
        return emit.op(aten.t.default, delta, label="delta_weight_t")  # [out, in] -> [in, out]
    return delta
