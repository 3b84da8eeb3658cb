"""IA3: a learned vector that rescales a site's output, or its input at feed-forward sites (as in PEFT). One
file: config, sites, nodes, fold, and PEFT's file format.

* output scaling: ``y = base(x) * l`` with ``l`` over the output features (the bias is scaled too);
* feed-forward sites (``feedforward_modules``): ``y = base(x * l)`` with ``l`` over the input features.

The graph reads ``where(gate, l, 1)``: switching the adapter off is a buffer write, not a new graph.

PEFT's file layout: ``base_model.model.<site>.ia3_l``, ``[out, 1]`` on a linear, ``[1, in]`` on a feed-forward
linear, ``[1, C, 1, ...]`` on a conv.
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
from fxpeft.targeting import matches
from fxpeft.untrusted import fullmatch

from .lora import adapter_dtype

__all__ = ["IA3Config", "IA3Adapter", "IA3"]

aten = torch.ops.aten


@dataclass
class IA3Config(PeftConfigBase):
    """IA3 settings, with HF PEFT's field names.

    Args:
        target_modules: which sites get a scaling vector (same forms as :class:`LoraConfig`).
        feedforward_modules: the subset of targets whose *input* is scaled instead of their output.
        exclude_modules: sites to skip.
        init_ia3_weights: True starts every vector at ones (the identity); False draws them at random.
        fan_in_fan_out: accepted for PEFT compatibility; fxpeft reads the weight layout off the graph.
        keep_base_dtype: keep ``l`` in a bf16/fp16 base's dtype instead of fp32 (PEFT's default is fp32).

    Example:
        >>> from fxpeft import IA3Config
        >>> IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]).peft_type
        'IA3'
    """

    feedforward_modules: list[str] | str | None = None
    init_ia3_weights: bool = True
    fan_in_fan_out: bool = False


_DEFAULT_FF = {"llama": ["down_proj"], "mistral": ["down_proj"], "gpt2": ["mlp.c_proj"],
               "bert": ["output.dense"], "roberta": ["output.dense"], "t5": ["wo"]}


def is_feedforward(config: IA3Config, name: str) -> bool:
    ff = config.feedforward_modules
    if not ff:
        return False
    if isinstance(ff, str):
        return fullmatch(ff, name, field="feedforward_modules")
    # PEFT's rule, kept so that one config picks the same sites in both libraries: a plain suffix match.
    return any(name.endswith(k) for k in ff)


class IA3Adapter(AdapterModule):
    """One IA3 vector ``l``, shaped to broadcast against the tensor it scales (``[n]``, or ``[n, 1, ...]`` for a conv)."""

    method = "ia3"

    def __init__(self, site: Site, adapter_name: str, feedforward: bool, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site.name, adapter_name)
        self.kind, self.is_feedforward = site.kind, feedforward
        n = site.in_features if feedforward else site.out_features
        trailing = (1,) * len(site.kernel_size)  # conv activations are [N, C, *spatial]
        self.l = nn.Parameter(torch.ones(n, *trailing, dtype=dtype, device=device))

    def vector(self) -> torch.Tensor:
        """``l``, flat, fp32 (what the fold multiplies by)."""
        return self.l.detach().float().flatten()


@PeftRegistry.register("ia3")
class IA3(Method):
    config_cls = IA3Config
    display_name = "IA3"
    color = ("#b2f2bb", "#2b8a3e")
    site_kinds = frozenset({"linear", "conv"})
    spec_aliases = {"ff": "feedforward_modules", "feedforward": "feedforward_modules", "init": "init_ia3_weights"}
    default_targets = {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
                       "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["key", "value", "output.dense"],
                       "roberta": ["key", "value", "output.dense"], "t5": ["k", "v", "wo"]}
    peft_default_table = "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING"
    peft_fields = frozenset({"modules_to_save"})

    @classmethod
    def validate_config(cls, config: IA3Config) -> None:
        ff, targets = config.feedforward_modules, config.target_modules
        if ff is not None and not (isinstance(ff, str) or isinstance(ff, (list, tuple)) and
                                   all(isinstance(x, str) for x in ff)):
            raise ConfigError(f"feedforward_modules must be a list of names or a regex string, got {ff!r}")
        if isinstance(ff, str):
            fullmatch(ff, "", field="feedforward_modules")  # compiles it: a bad regex fails here, typed
        if isinstance(ff, (list, tuple)) and isinstance(targets, (list, tuple)):
            extra = [m for m in ff if m not in targets]
            if extra:
                raise ConfigError(f"feedforward_modules {extra} are not in target_modules; add them to target_modules")
        if not isinstance(config.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be True or False, got {config.init_ia3_weights!r}")

    @classmethod
    def fill_defaults(cls, config: IA3Config, model_type: str | None) -> IA3Config:
        if config.target_modules is None and config.feedforward_modules is None:
            config.feedforward_modules = _peft_table("TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
                                                     model_type) or _DEFAULT_FF.get(model_type)
        return config

    @classmethod
    def check_site(cls, site: Site, config: IA3Config) -> str | None:
        if site.kind == "conv" and site.groups != 1 and is_feedforward(config, site.name):
            return f"input scaling of a grouped convolution (groups={site.groups}) is not supported"
        return super().check_site(site, config)

    @classmethod
    def build(cls, site: Site, config: IA3Config, adapter_name: str, weight: torch.Tensor) -> IA3Adapter:
        adapter = IA3Adapter(site, adapter_name, is_feedforward(config, site.name),
                             adapter_dtype(weight, config.keep_base_dtype), weight.device)
        if not config.init_ia3_weights:
            with torch.no_grad():
                nn.init.normal_(adapter.l)
        return adapter

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: IA3Adapter) -> None:
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        cast = adapter.l.dtype != base_dtype
        target = emit.call.input if adapter.is_feedforward else emit.call.node
        where = emit.call.node if adapter.is_feedforward else emit.call.node.next
        with emit.graph.inserting_before(where):  # feed-forward: the call must read the scaled input
            l = emit.op(aten.where.ScalarOther, emit.param("gate", Role.PARAM), emit.param("l", Role.PARAM), 1.0)
            scaled = emit.op(aten.mul.Tensor, target, l, role=Role.COMPUTE if cast else Role.OUT, replaces=0)
            out = emit.cast(scaled, base_dtype, role=Role.OUT, replaces=0) if cast else scaled
        if adapter.is_feedforward:
            emit.replace_input(target, out)
        else:
            emit.replace_output(out)

    @classmethod
    def fold(cls, adapter: IA3Adapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        vec = adapter.vector()
        shape = cls._axis_shape(adapter, site, weight)
        weight = weight * vec.view(shape)
        if bias is not None and not adapter.is_feedforward:
            bias = bias * vec
        return weight, bias

    @classmethod
    def unfold(cls, adapter: IA3Adapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        vec = adapter.vector()
        if not bool((vec != 0).all()):
            raise ConfigError(f"IA3 vector at {site.name!r} has zeros: its merge cannot be undone")
        weight = weight / vec.view(cls._axis_shape(adapter, site, weight))
        if bias is not None and not adapter.is_feedforward:
            bias = bias / vec
        return weight, bias

    @staticmethod
    def _axis_shape(adapter: IA3Adapter, site: Site, weight: torch.Tensor) -> list[int]:
        # The weight's axis that the vector runs along: output rows, or input columns at feed-forward sites.
        # A transposed ([in, out]) linear weight swaps the two.
        axis = 1 if adapter.is_feedforward else 0
        if site.kind == "linear" and site.fan_in_fan_out:
            axis = 1 - axis
        shape = [1] * weight.dim()
        shape[axis] = -1
        return shape

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: IA3Config, site: Site) -> dict[str, tuple[int, ...]]:
        ff = is_feedforward(config, site.name)
        n = site.in_features if ff else site.out_features
        if site.kind == "conv":
            return {"ia3_l": (1, n, *(1,) * len(site.kernel_size))}
        return {"ia3_l": (1, n) if ff else (n, 1)}

    @classmethod
    def site_tensors(cls, adapter: IA3Adapter, site: Site) -> dict[str, torch.Tensor]:
        return {"ia3_l": adapter.l.detach()}

    @classmethod
    def load_site_tensors(cls, adapter: IA3Adapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            adapter.l.copy_(tensors["ia3_l"].reshape(adapter.l.shape))

    @classmethod
    def swap_in(cls, adapter: IA3Adapter, site: Site, config: IA3Config, tensors: dict[str, torch.Tensor]) -> None:
        if is_feedforward(config, site.name) != adapter.is_feedforward:
            raise AdapterFileError(f"{site.name}: the file scales the site's {'input' if not adapter.is_feedforward else 'output'}, "
                                   "the adapter its other side; a hot-swap cannot change that")
        cls.load_site_tensors(adapter, site, tensors)

    @classmethod
    def site_settings(cls, config: IA3Config, site: Site) -> dict[str, Any]:
        return {"feedforward": is_feedforward(config, site.name)}

    @classmethod
    def adapter_settings(cls, adapter: IA3Adapter) -> dict[str, Any]:
        return {"feedforward": bool(adapter.is_feedforward)}

    @classmethod
    def target_partition(cls, adapter: IA3Adapter) -> Any:
        return bool(adapter.is_feedforward)

    @classmethod
    def config_fields(cls, adapters: dict[str, IA3Adapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        # Each target key covers sites of one kind (target_partition), so the feed-forward keys are a subset of
        # target_modules, as PEFT requires.
        ff = [k for k in target_modules if any(m.is_feedforward for n, m in adapters.items() if matches([k], n))]
        return {"feedforward_modules": ff, "init_ia3_weights": True,
                "fan_in_fan_out": any(sites[n].module_type == "Conv1D" for n in adapters)}


def _peft_table(name: str, model_type: str | None) -> list[str] | None:
    try:
        from peft.utils import constants

        table = getattr(constants, name)
        return list(table[model_type]) if model_type in table else None
    except (ImportError, AttributeError):
        return None
