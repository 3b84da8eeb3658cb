"""LoRA: ``y = base(x) + B(A(dropout(x))) * scaling``, with PEFT's maths per site kind.

* linear: A ``[r, in]``, B ``[out, r]``;
* conv: A is a conv with the base kernel, stride, padding and dilation (``[r, in, *k]``), B a 1x1 conv ``[out, r, 1..]``;
* embedding: A ``[r, num_embeddings]``, B ``[dim, r]``, delta ``embedding(x, A.T) @ B.T`` (no dropout, as in PEFT).

The scaling multiplies the rank-``r`` intermediate rather than the ``out``-wide result: the same product,
``out / r`` times fewer multiplies. It is left out when it is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxpeft.errors import ConfigError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Call, Site

__all__ = ["LoraConfig", "LoraAdapter", "LoraDropout", "Lora"]


@dataclass
class LoraConfig(PeftConfigBase):
    """LoRA settings, with HF PEFT's field names and defaults.

    Args:
        r: rank of the update.
        lora_alpha: scaling numerator: scaling is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter's input (a ``call_module`` on ``nn.Dropout``).
        target_modules: list of names (exact, or matching the last dotted components), a regex string that
            must full-match, or ``"all-linear"``.
        exclude_modules: same forms as ``target_modules``; matching sites are skipped.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        init_lora_weights: True (kaiming A, zero B), ``"gaussian"`` (normal A with std ``1/r``, zero B), or False
            (both random: the adapter changes the outputs from the start).
        rank_pattern: ``{pattern: r}`` overrides per site (PEFT's matching: ``(.*\\.)?pattern$``).
        alpha_pattern: ``{pattern: alpha}`` overrides per site.
        fan_in_fan_out: accepted for PEFT compatibility; fxpeft reads the weight layout off the graph.
        bias: only ``"none"`` is supported.
        use_dora: only False is supported.

    Example:
        >>> from fxpeft import LoraConfig
        >>> LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]).r
        8
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_dora: bool = False


class LoraDropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask on the CPU (PyTorch's CPU ``bernoulli_`` costs ~6 ns per element).

    In training on the CPU it draws 16 random bits per element (four per 64-bit draw of the default
    generator, so ``torch.manual_seed`` reproduces it) and keeps an element when they fall below
    ``round((1 - p) * 2**16)``: ``p`` is rounded to a multiple of ``2**-16`` (off by at most ``7.7e-6``), and
    kept elements are scaled by the exact inverse of the keep probability, so the expectation is unchanged.
    Under ``torch.compile``, on other devices, in eval mode, and for ``p`` that rounds to 0 or 1 it is
    ``nn.Dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = 65536 - round(self.p * 65536)
        if (not self.training or self.inplace or x.device.type != "cpu" or not 0 < keep < 65536
                or torch.compiler.is_compiling()):
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None).view(torch.int16)[:n]
        scale = torch.full((), 65536 / keep, dtype=x.dtype)
        return x * torch.where(bits.view(x.shape) < keep - 32768, scale, torch.zeros((), dtype=x.dtype))


class LoraAdapter(AdapterModule):
    """The parameters of one LoRA adapter at one site: ``A``, ``B``, and an optional ``dropout``."""

    method = "lora"

    def __init__(self, site: Site, adapter_name: str, r: int, lora_alpha: float, use_rslora: bool,
                 dropout: float, weight: torch.Tensor) -> None:
        super().__init__(site.name, adapter_name)
        self.kind = site.kind
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        kw = dict(dtype=weight.dtype, device=weight.device)
        if site.kind == "conv":
            ones = (1,) * len(site.kernel_size)
            self.A = nn.Parameter(torch.empty(r, site.in_features, *site.kernel_size, **kw))
            self.B = nn.Parameter(torch.empty(site.out_features, r, *ones, **kw))
        else:  # linear: in/out features; embedding: num_embeddings/embedding_dim
            self.A = nn.Parameter(torch.empty(r, site.in_features, **kw))
            self.B = nn.Parameter(torch.empty(site.out_features, r, **kw))
        if dropout > 0 and site.kind != "embedding":
            self.dropout = LoraDropout(dropout)

    def reset_parameters(self, init: bool | str) -> None:
        with torch.no_grad():
            if self.kind == "embedding":
                if init is False:
                    nn.init.normal_(self.A), nn.init.normal_(self.B)
                else:  # PEFT (after loralib): zero A, normal B
                    nn.init.zeros_(self.A), nn.init.normal_(self.B)
                return
            if init == "gaussian":
                nn.init.normal_(self.A, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.B)

    def delta_weight(self, site: Site) -> torch.Tensor:
        """The fp32 update to the base weight, in the weight's own layout."""
        A, B = self.A.detach().float(), self.B.detach().float()
        if site.kind == "conv":
            # [out, r] @ [r, in*k] -> [out, in, *k]
            return (B.flatten(1) @ A.flatten(1)).view(site.out_features, site.in_features, *site.kernel_size) * self.scaling
        delta = (B @ A) * self.scaling  # [out, in]; for an embedding [dim, num]
        return delta.T if (site.kind == "embedding" or site.fan_in_fan_out) else delta


@PeftRegistry.register("lora")
class Lora(Method):
    config_cls = LoraConfig

    @classmethod
    def validate_config(cls, config: LoraConfig) -> None:
        def check_r(r, where):
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise ConfigError(f"{where} must be a positive integer, got {r!r}; set e.g. r=8")

        check_r(config.r, "r")
        for k, v in config.rank_pattern.items():
            check_r(v, f"rank_pattern[{k!r}]")
        if not 0.0 <= config.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {config.lora_dropout!r}")
        if config.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(
                f"init_lora_weights={config.init_lora_weights!r} is not supported; use True, False or 'gaussian'")
        if config.bias != "none":
            raise ConfigError(f"bias={config.bias!r} is not supported; fxpeft trains no biases, use bias='none'")
        if config.use_dora:
            raise ConfigError("use_dora=True is not supported yet; use plain LoRA (use_dora=False)")

    @classmethod
    def check_site(cls, site: Site, config: LoraConfig) -> str | None:
        if site.kind == "conv" and site.groups != 1:
            return f"grouped convolution (groups={site.groups}) is not supported by LoRA"
        return None

    @classmethod
    def build(cls, site: Site, config: LoraConfig, adapter_name: str, weight: torch.Tensor) -> LoraAdapter:
        r = _pattern_value(config.rank_pattern, site.name, config.r)
        alpha = _pattern_value(config.alpha_pattern, site.name, config.lora_alpha)
        adapter = LoraAdapter(site, adapter_name, r, alpha, config.use_rslora, config.lora_dropout, weight)
        adapter.reset_parameters(config.init_lora_weights)
        return adapter

    @classmethod
    def insert(cls, emit: Emit, call: Call, site: Site, adapter: LoraAdapter) -> None:
        x, y = call.input, call.node
        A = emit.get_attr("A", "lora_A_weight")
        B = emit.get_attr("B", "lora_B_weight")
        if site.kind == "embedding":
            table = emit.fn("t", A, role="lora_A_t")  # [r, num] -> [num, r]
            pad = -1 if site.padding_idx is None else site.padding_idx
            args = (table, x, pad) if emit.export else (x, table, site.padding_idx)
            a = emit.fn("embedding", *args, role="lora_A")  # [..., r]
        else:
            if hasattr(adapter, "dropout"):
                x = emit.call_module("dropout", x, "dropout")
            if site.kind == "conv":
                nd = len(site.kernel_size)
                # A sees exactly the windows the base kernel sees: same stride, padding and dilation.
                pad = site.padding if isinstance(site.padding, str) else list(site.padding)
                op = f"conv{nd}d_str" if isinstance(pad, str) else f"conv{nd}d"
                a = emit.fn(op, x, A, None, list(site.stride), pad, list(site.dilation), 1,
                            role="lora_A")  # [N, r, *spatial]
            else:
                a = emit.fn("linear", x, A, role="lora_A")  # [..., r]
        if adapter.scaling != 1.0:
            a = emit.fn("mul", a, adapter.scaling, role="scale")
        if site.kind == "conv":
            nd = len(site.kernel_size)
            b = emit.fn(f"conv{nd}d", a, B, role="lora_B")  # 1x1: [N, out, *spatial]
        else:
            b = emit.fn("linear", a, B, role="lora_B")  # [..., out]
        out = emit.fn("add", y, b, role="out")
        y.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)

    @classmethod
    def fold(cls, adapter: LoraAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + adapter.delta_weight(site), bias


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's per-site override lookup: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    import re

    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
