"""IA3: a learned vector that rescales a site's output, or its input at feed-forward sites (as in PEFT).

* output scaling: ``y = base(x) * l`` with ``l`` over the output features (the bias is scaled too);
* feed-forward sites (``feedforward_modules``): ``y = base(x * l)`` with ``l`` over the input features.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from fxpeft.errors import ConfigError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Call, Site

__all__ = ["IA3Config", "IA3Adapter", "IA3"]


@dataclass
class IA3Config(PeftConfigBase):
    """IA3 settings, with HF PEFT's field names.

    Args:
        target_modules: which sites get a scaling vector (same forms as :class:`LoraConfig`).
        feedforward_modules: the subset of targets whose *input* is scaled instead of their output.
        exclude_modules: sites to skip.
        init_ia3_weights: True starts every vector at ones (the identity); False draws them at random.
        fan_in_fan_out: accepted for PEFT compatibility; fxpeft reads the weight layout off the graph.

    Example:
        >>> from fxpeft import IA3Config
        >>> IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]).peft_type
        'IA3'
    """

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_ia3_weights: bool = True
    fan_in_fan_out: bool = False


def is_feedforward(config: IA3Config, name: str) -> bool:
    ff = config.feedforward_modules
    if not ff:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    # PEFT's rule, kept so that one config picks the same sites in both libraries: a plain suffix match.
    return any(name.endswith(k) for k in ff)


class IA3Adapter(AdapterModule):
    """One IA3 vector ``l``, shaped to broadcast against the tensor it scales (``[n]``, or ``[n, 1, ...]`` for a conv)."""

    method = "ia3"

    def __init__(self, site: Site, adapter_name: str, feedforward: bool, weight: torch.Tensor) -> None:
        super().__init__(site.name, adapter_name)
        self.kind, self.is_feedforward = site.kind, feedforward
        n = site.in_features if feedforward else site.out_features
        trailing = (1,) * len(site.kernel_size)  # conv activations are [N, C, *spatial]
        self.l = nn.Parameter(torch.ones(n, *trailing, dtype=weight.dtype, device=weight.device))


@PeftRegistry.register("ia3")
class IA3(Method):
    config_cls = IA3Config

    @classmethod
    def validate_config(cls, config: IA3Config) -> None:
        if isinstance(config.feedforward_modules, list) and isinstance(config.target_modules, list):
            extra = [m for m in config.feedforward_modules if m not in config.target_modules]
            if extra:
                raise ConfigError(f"feedforward_modules {extra} are not in target_modules; add them to target_modules")

    @classmethod
    def check_site(cls, site: Site, config: IA3Config) -> str | None:
        if site.kind == "embedding":
            return "IA3 scales linear and conv sites only (PEFT's IA3 has no embedding layer)"
        if site.kind == "conv" and site.groups != 1 and is_feedforward(config, site.name):
            return f"input scaling of a grouped convolution (groups={site.groups}) is not supported"
        return None

    @classmethod
    def build(cls, site: Site, config: IA3Config, adapter_name: str, weight: torch.Tensor) -> IA3Adapter:
        adapter = IA3Adapter(site, adapter_name, is_feedforward(config, site.name), weight)
        if not config.init_ia3_weights:
            with torch.no_grad():
                nn.init.normal_(adapter.l)
        return adapter

    @classmethod
    def insert(cls, emit: Emit, call: Call, site: Site, adapter: IA3Adapter) -> None:
        if adapter.is_feedforward:
            x = call.input
            with emit.graph.inserting_before(call.node):  # the call reads the scaled input
                l = emit.get_attr("l", "ia3_l_weight")
                out = emit.fn("mul", x, l, role="out")  # scales the input features
            call.node.replace_input_with(x, out)
        else:
            l = emit.get_attr("l", "ia3_l_weight")
            y = call.node
            out = emit.fn("mul", y, l, role="out")  # scales the output features (bias included)
            y.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)

    @classmethod
    def fold(cls, adapter: IA3Adapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        vec = adapter.l.detach().float().flatten()
        # The weight's axis that ``vec`` runs along: output rows, or input columns at feed-forward sites.
        # A transposed ([in, out]) linear weight swaps the two.
        axis = 1 if adapter.is_feedforward else 0
        if site.kind == "linear" and site.fan_in_fan_out:
            axis = 1 - axis
        shape = [1] * weight.dim()
        shape[axis] = -1
        weight = weight * vec.view(shape)
        if bias is not None and not adapter.is_feedforward:
            bias = bias * vec
        return weight, bias
