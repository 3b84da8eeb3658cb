"""VeRA: vector-based random matrix adaptation, interchangeable with HF PEFT's ``VeraConfig``. One file: config,
sites, nodes, fold, and PEFT's file format.

One pair of frozen random matrices is shared by every site of an adapter (the method's shared state,
:meth:`Method.shared_state`): ``A [r, in_max]`` and ``B [out_max, r]``, sized by the largest input and output over
the targeted sites. Each site trains two vectors, ``λd [r]`` and ``λb [out]``, and reads the slices
``A[:, :in]`` and ``B[:out, :]``::

    y = base(x) + λb ⊙ (B[:out] @ (λd ⊙ (A[:, :in] @ dropout(x))))
    ΔW = (λb ⊙ B[:out]) @ (λd ⊙ A[:, :in])              [out, in]   (the exact fold; transposed for [in, out])

**In the graph** the update is PEFT's two-path form: a thin ``x @ Aᵀ`` (the ``DOWN`` node, on the ``DOWN_WEIGHT``
slice of the shared ``A``), ``λd`` on that ``[..., r]`` activation (the ``SCALE`` node; ``λd`` times the run-time
``scale`` buffer, 0 while the adapter is off or merged), ``@ Bᵀ`` (``UP``), ``⊙ λb``, and the sum with ``y``.
The vectors multiply activations rather than the matrices on purpose: ``λb ⊙ B`` would make autograd compute a full
``[out, r]`` matrix gradient (a ``T·out·r`` matmul) where the elementwise form needs a ``T·out`` reduction. Reading
``W + ΔW`` in the call instead was weighed and rejected for training: ``W + ΔW`` requires grad, so autograd computes a
full ``[out, in]`` weight gradient; with building ΔW and its backward that is ``T·out·in + 3·out·in·r`` multiply-adds
per step against ``2·T·r·(in + out)`` for the thin matmuls and their input gradients (in = out = T = 512, r = 256:
335M against 268M, and the siblings' shared projection cuts the latter further).
Sibling sites that read one input (q/k/v, gate/up) slice the same ``A[:, :in]``, so
:class:`fxpeft.passes.FuseLowRankSiblings` computes ``x @ A[:, :in]ᵀ`` once for the group (``fuse=False`` keeps one
per site, PEFT's form). Dropout is PEFT's ``vera_dropout`` on the adapter's input.

The matrices are PEFT's to the bit: kaiming-uniform (``gain √2``, fan-in) draws from a CPU ``torch.Generator``
seeded with ``projection_prng_key``, ``A`` first, then ``B``, in fp32, rounded through the base dtype as PEFT's
device move does. A file saved with ``save_projection=False`` carries no matrices and reloads with these.

Sites: ``nn.Linear`` and weights stored ``[in, out]`` (HF ``Conv1D``), as PEFT 0.21.2; convolutions and
embeddings are refused (PEFT's VeRA has no layer for them).

A hot-swap (:func:`fxpeft.hotswap_adapter`) replaces the vectors and, when the file holds them, the matrices in
place; it keeps ``r``, ``vera_dropout`` and ``save_projection``, and a file without matrices must share the adapter's
key.

PEFT's file layout::

    base_model.model.<site>.vera_lambda_b   [out]
    base_model.model.<site>.vera_lambda_d   [r]
    base_model.vera_A                       [r, in_max]    (save_projection=True)
    base_model.vera_B                       [out_max, r]   (save_projection=True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxpeft.errors import AdapterFileError, ConfigError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Site
from fxpeft.tags import Role

from .loha import common_value
from .lora import LoraDropout, _finite, adapter_dtype

__all__ = ["VeraConfig", "VeraAdapter", "VeraProjections", "Vera", "vera_projections"]

aten = torch.ops.aten

_A_KEY, _B_KEY = "base_model.vera_A", "base_model.vera_B"


@dataclass
class VeraConfig(PeftConfigBase):
    """VeRA settings, with HF PEFT's field names and defaults.

    Args:
        r: rows of the shared random matrices (VeRA's "rank"; larger than a LoRA rank: only ``r`` numbers per site
            are trained).
        projection_prng_key: the seed of the shared matrices (PEFT's generator, so the same key gives PEFT's).
        save_projection: save the shared matrices in the file (else they are regenerated from the key on load).
        vera_dropout: dropout on the adapter's input (a ``call_module`` on ``nn.Dropout``).
        d_initial: the initial value of every ``λd`` entry (``λb`` starts at zero: the identity at start).
        fan_in_fan_out: accepted for PEFT compatibility; fxpeft reads the weight layout off the graph.
        bias: ``"none"``; ``"all"`` trains every base bias, ``"vera_only"`` the adapted sites' biases, each as a
            per-adapter copy (:mod:`fxpeft.copies`).
        init_weights: True (PEFT's init, above) or False (``λb`` ones and ``λd`` normal: the adapter changes the
            outputs from the start).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as for every method.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 3))),
        ...                     fxpeft.VeraConfig(r=8, target_modules=["0"]))
        >>> sorted(n for n, p in gm.named_parameters() if p.requires_grad)
        ['0.vera_default.lambda_b', '0.vera_default.lambda_d']
    """

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's draw for the shared matrices: uniform in ``±√3·√2/√fan_in`` (fan_in = ``shape[1]``), fp32, CPU."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(r: int, in_max: int, out_max: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared ``(A [r, in_max], B [out_max, r])`` that PEFT draws for ``projection_prng_key=key`` (fp32, CPU).

    Example:
        >>> from fxpeft.methods.vera import vera_projections
        >>> A, B = vera_projections(4, 6, 5, key=0)
        >>> tuple(A.shape), tuple(B.shape), torch.equal(A, vera_projections(4, 6, 5, key=0)[0])
        ((4, 6), (5, 4), True)
    """
    generator = torch.Generator(device="cpu").manual_seed(key)
    A = _kaiming_uniform((r, in_max), generator)
    return A, _kaiming_uniform((out_max, r), generator)


class VeraProjections(nn.Module):
    """The state one VeRA adapter shares across its sites: the frozen ``vera_A`` / ``vera_B`` buffers (PEFT keeps
    them as buffers too, so they count in no parameter total)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, save_projection: bool) -> None:
        super().__init__()
        self.save_projection = save_projection  # files carry the matrices, or only the key that regenerates them
        self.register_buffer("vera_A", A)
        self.register_buffer("vera_B", B)


class VeraAdapter(AdapterModule):
    """One VeRA adapter at one site: the trained ``lambda_b [out]`` and ``lambda_d [r]``, the run-time ``scale``
    buffer (1 while on, 0 while off or merged), an optional ``dropout``, and a reference (not a submodule: the
    state is the graph's, saved once) to the adapter's :class:`VeraProjections`, set when its nodes are inserted."""

    method = "vera"

    def __init__(self, site: Site, adapter_name: str, config: VeraConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site.name, adapter_name)
        self.r, self.in_features, self.out_features = config.r, site.in_features, site.out_features
        self.fan_in_fan_out = site.fan_in_fan_out
        self.projection_prng_key, self.save_projection = config.projection_prng_key, config.save_projection
        self.d_initial = float(config.d_initial)
        kw = {"dtype": dtype, "device": device}
        self.lambda_b = nn.Parameter(torch.empty(site.out_features, **kw))
        self.lambda_d = nn.Parameter(torch.empty(config.r, **kw))
        self.register_buffer("scale", torch.ones((), **kw), persistent=False)
        if config.vera_dropout > 0:
            self.dropout = LoraDropout(config.vera_dropout)
        object.__setattr__(self, "projections", None)  # a plain reference: nn.Module would register it

    def gate_changed(self, on: bool) -> None:
        with torch.no_grad():
            self.scale.fill_(1.0 if on else 0.0)

    def reset_parameters(self, init: bool, base_dtype: torch.dtype) -> None:
        """PEFT's init: ``λb = 0`` and ``λd = d_initial`` (or, with ``init=False``, ``λb = 1`` and ``λd`` normal),
        rounded through the base dtype as PEFT's move to the base layer rounds them."""
        with torch.no_grad():
            d = torch.randn(self.r)  # drawn either way, as PEFT does
            b = torch.ones(self.out_features)
            if init:
                d.fill_(self.d_initial), b.zero_()
            for p, v in ((self.lambda_d, d), (self.lambda_b, b)):
                p.copy_(v.to(base_dtype) if base_dtype.is_floating_point else v)

    def delta_weight(self) -> torch.Tensor:
        """The fp32 ``ΔW = (λb ⊙ B[:out]) @ (λd ⊙ A[:, :in])`` in the weight's stored layout (on or not)."""
        shared = self.projections
        A = shared.vera_A[:, : self.in_features].float()  # [r, in]
        B = shared.vera_B[: self.out_features].float()  # [out, r]
        b, d = self.lambda_b.detach().float(), self.lambda_d.detach().float()
        delta = (b[:, None] * B) @ (d[:, None] * A)  # [out, in]
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


@PeftRegistry.register("vera")
class Vera(Method):
    config_cls = VeraConfig
    display_name = "VeRA"
    color = ("#d3f9d8", "#2b8a3e")
    site_kinds = frozenset({"linear"})
    spec_aliases = {"dropout": "vera_dropout", "init": "init_weights", "seed": "projection_prng_key"}
    default_targets = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                       "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
                       "bert": ["query", "value"], "roberta": ["query", "value"], "opt": ["q_proj", "v_proj"],
                       "gpt_neox": ["query_key_value"], "t5": ["q", "v"]}
    peft_default_table = "TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING"

    # ---------------------------------------------------------------------------------- config and sites
    @classmethod
    def validate_config(cls, config: VeraConfig) -> None:
        if not (isinstance(config.r, int) and not isinstance(config.r, bool) and config.r > 0):
            raise ConfigError(f"r must be a positive integer, got {config.r!r}; set e.g. r=256")
        key = config.projection_prng_key
        if not (isinstance(key, int) and not isinstance(key, bool) and 0 <= key < 2 ** 64):
            raise ConfigError(f"projection_prng_key must be an integer in [0, 2**64) (a torch.Generator seed), "
                              f"got {key!r}")
        for name in ("save_projection", "init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(config, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(config, name)!r}")
        if not (_finite(config.vera_dropout) and 0.0 <= config.vera_dropout < 1.0):
            raise ConfigError(f"vera_dropout must be a number in [0, 1), got {config.vera_dropout!r}")
        if not _finite(config.d_initial):
            raise ConfigError(f"d_initial must be a finite number, got {config.d_initial!r}")
        if config.bias not in ("none", "all", "vera_only"):
            raise ConfigError(f"bias={config.bias!r} is not supported; use 'none', 'all' or 'vera_only'")

    @classmethod
    def check_site(cls, site: Site, config: VeraConfig) -> str | None:
        if site.kind != "linear":
            what = "an embedding" if site.kind == "embedding" else "a convolution"
            return (f"{what}: PEFT's VeRA adapts nn.Linear and HF Conv1D only; leave it out of target_modules, or "
                    "use LoRA there")
        return super().check_site(site, config)

    # ---------------------------------------------------------------------------------- shared state
    @classmethod
    def shared_state(cls, config: VeraConfig, sites: list[Site], adapter_name: str, dtype: torch.dtype,
                     device: torch.device) -> VeraProjections:
        # PEFT draws in fp32 on the CPU, moves to the base layer (its dtype: a round trip for bf16/fp16), then
        # keeps the adapter in fp32 (autocast_adapter_dtype)
        in_max, out_max = max(s.in_features for s in sites), max(s.out_features for s in sites)
        A, B = vera_projections(config.r, in_max, out_max, config.projection_prng_key)
        held = adapter_dtype(torch.empty((), dtype=dtype), config.keep_base_dtype)
        if dtype.is_floating_point:
            A, B = A.to(dtype), B.to(dtype)
        return VeraProjections(A.to(device, held), B.to(device, held), config.save_projection)

    @classmethod
    def shared_shapes(cls, config: VeraConfig, sites: list[Site]) -> dict[str, tuple[int, ...]]:
        if not config.save_projection:
            return {}
        return {_A_KEY: (config.r, max(s.in_features for s in sites)),
                _B_KEY: (max(s.out_features for s in sites), config.r)}

    @classmethod
    def shared_tensors(cls, shared: VeraProjections) -> dict[str, torch.Tensor]:
        return {_A_KEY: shared.vera_A, _B_KEY: shared.vera_B} if shared.save_projection else {}

    @classmethod
    def load_shared_tensors(cls, shared: VeraProjections, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            shared.vera_A.copy_(tensors[_A_KEY]), shared.vera_B.copy_(tensors[_B_KEY])

    # ---------------------------------------------------------------------------------- graph
    @classmethod
    def build(cls, site: Site, config: VeraConfig, adapter_name: str, weight: torch.Tensor) -> VeraAdapter:
        adapter = VeraAdapter(site, adapter_name, config, adapter_dtype(weight, config.keep_base_dtype), weight.device)
        adapter.reset_parameters(config.init_weights, weight.dtype)
        return adapter

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: VeraAdapter) -> None:
        shared = emit.gm.get_submodule(Method.shared_path(cls.name, adapter.adapter_name))
        object.__setattr__(adapter, "projections", shared)  # for fold/unfold, which see no graph
        dtype = adapter.lambda_d.dtype
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        x, y = emit.call.input, emit.call.node
        if dtype != base_dtype:
            x = emit.cast(x, dtype)
        if hasattr(adapter, "dropout"):
            x = emit.module("dropout", x, role=Role.DROPOUT)
        A = emit.op(aten.slice.Tensor, emit.shared("vera_A", label="vera_A"), 1, 0, site.in_features,
                    role=Role.DOWN_WEIGHT, label="A")  # [r, in_max] -> [r, in]
        h = emit.op(aten.linear.default, x, A, role=Role.DOWN)  # [..., r]
        d = emit.op(aten.mul.Tensor, emit.param("lambda_d", label="lambda_d"), emit.param("scale", Role.SCALING),
                    role=Role.SCALING, label="lambda_d_gated")  # [r]: 0 while the adapter is off
        h = emit.op(aten.mul.Tensor, h, d, role=Role.SCALE)  # [..., r]
        B = emit.op(aten.slice.Tensor, emit.shared("vera_B", label="vera_B"), 0, 0, site.out_features,
                    role=Role.UP_WEIGHT, label="B")  # [out_max, r] -> [out, r]
        up = emit.op(aten.linear.default, h, B, role=Role.UP)  # [..., out]
        # λb ⊙ up, then y + that: PEFT's order (an addcmul would fuse the two, but its meta kernel fails on the
        # symbolic shapes that export and dynamic compile use)
        up = emit.op(aten.mul.Tensor, up, emit.param("lambda_b", label="lambda_b"), label="up_scaled")  # [..., out]
        if dtype != base_dtype:  # PEFT adds in the adapter's dtype, then casts the sum back: one rounding
            total = emit.op(aten.add.Tensor, y, up, replaces=0, label="sum")
            out = emit.cast(total, base_dtype, role=Role.OUT, replaces=0)
        else:
            out = emit.op(aten.add.Tensor, y, up, role=Role.OUT, replaces=0, label="out")
        emit.replace_output(out)

    @classmethod
    def fold(cls, adapter: VeraAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + adapter.delta_weight(), bias

    @classmethod
    def unfold(cls, adapter: VeraAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight - adapter.delta_weight(), bias

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: VeraConfig, site: Site) -> dict[str, tuple[int, ...]]:
        return {"vera_lambda_b": (site.out_features,), "vera_lambda_d": (config.r,)}

    @classmethod
    def site_tensors(cls, adapter: VeraAdapter, site: Site) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": adapter.lambda_b.detach(), "vera_lambda_d": adapter.lambda_d.detach()}

    @classmethod
    def load_site_tensors(cls, adapter: VeraAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            adapter.lambda_b.copy_(tensors["vera_lambda_b"]), adapter.lambda_d.copy_(tensors["vera_lambda_d"])

    @classmethod
    def swap_in(cls, adapter: VeraAdapter, site: Site, config: VeraConfig, tensors: dict[str, torch.Tensor]) -> None:
        # The vectors are replaced here; the shared matrices, when the file holds them, by the caller afterwards.
        # A file without them relies on its key: it must be the key the adapter's matrices were drawn with.
        p = float(getattr(getattr(adapter, "dropout", None), "p", 0.0))
        problems = [(config.r != adapter.r, f"r={config.r}, the adapter r={adapter.r}"),
                    (float(config.vera_dropout) != p, f"vera_dropout={config.vera_dropout}, the adapter {p}"),
                    (config.save_projection != adapter.save_projection,
                     f"save_projection={config.save_projection}, the adapter {adapter.save_projection}"),
                    (not config.save_projection and config.projection_prng_key != adapter.projection_prng_key,
                     (f"projection_prng_key={config.projection_prng_key} and no matrices, while the adapter's "
                      f"matrices come from key {adapter.projection_prng_key}"))]
        why = next((msg for bad, msg in problems if bad), None)
        if why is not None:
            raise AdapterFileError(f"{site.name}: the file has {why}; a hot-swap keeps shapes and settings: use "
                                   "load_adapter")
        cls.load_site_tensors(adapter, site, tensors)
        adapter.projection_prng_key, adapter.d_initial = config.projection_prng_key, float(config.d_initial)

    @classmethod
    def site_settings(cls, config: VeraConfig, site: Site) -> dict[str, Any]:
        return {"r": config.r, "dropout": float(config.vera_dropout), "key": config.projection_prng_key,
                "save_projection": config.save_projection}

    @classmethod
    def adapter_settings(cls, adapter: VeraAdapter) -> dict[str, Any]:
        return {"r": adapter.r, "dropout": float(getattr(getattr(adapter, "dropout", None), "p", 0.0)),
                "key": adapter.projection_prng_key, "save_projection": adapter.save_projection}

    @classmethod
    def config_fields(cls, adapters: dict[str, VeraAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        return {"r": common_value(adapters, "r", lambda m: m.r),
                "projection_prng_key": common_value(adapters, "projection_prng_key", lambda m: m.projection_prng_key),
                "save_projection": common_value(adapters, "save_projection", lambda m: m.save_projection),
                "vera_dropout": common_value(adapters, "vera_dropout",
                                             lambda m: float(getattr(getattr(m, "dropout", None), "p", 0.0))),
                "d_initial": common_value(adapters, "d_initial", lambda m: m.d_initial),
                "fan_in_fan_out": any(sites[n].fan_in_fan_out for n in adapters), "bias": "none",
                "init_weights": True, "layers_to_transform": None, "layers_pattern": None}
