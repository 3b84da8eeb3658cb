"""P-tuning: virtual tokens computed by a small prompt encoder, interchangeable with HF PEFT's
``PromptEncoderConfig`` (``P_TUNING``, https://huggingface.co/papers/2103.10385). One file: config, encoder, and
PEFT's file format.

The graph edit is prompt tuning's (:class:`~fxpeft.methods.prompt_tuning.PromptTuning`, reused as it is: the
sequence inputs gain ``NV`` positions, the prompt rows are written over the embedding's first ``NV`` positions,
logits ``[B, NV+T, V]`` as PEFT returns them). Only the rows' source differs: a ``call_module`` on the
:class:`PromptEncoder` (the adapter's shared state), which runs PEFT's ``PromptEncoder`` on the virtual token ids
``0..NV-1``: an embedding, then an MLP head (``MLP``) or a bidirectional LSTM and an MLP head (``LSTM``). The call
is a submodule call, so ``train()``/``eval()`` switch the LSTM's dropout.

**Files.** As PEFT, a file holds the encoder's *output*, ``prompt_embeddings [NV, dim]`` (computed in eval mode),
not the encoder: PEFT loads fxpeft's files and the other way round. Loading a file gives the encoder PEFT's
inference form: the prompt is the file's rows, the MLP/LSTM heads are dropped (a :class:`UserWarning` says so).
Those rows stay trainable, but training then tunes the rows directly (prompt tuning), not an encoder; to train the
encoder, start from a fresh adapter.

Refused with a typed error, the graph unchanged: what prompt tuning refuses, an unknown reparameterisation type,
non-positive sizes, a dropout outside ``[0, 1)``. Merging is refused (:class:`~fxpeft.MergeError`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import ConfigError
from fxpeft.registry import (
    AdapterModule,
    Emit,
    PeftConfigBase,
    PeftRegistry,
    config_from_fields,
)
from fxpeft.sites import Site

from .lora import adapter_dtype
from .prompt_tuning import _KEY, PromptSwitch, PromptTuning, PromptTuningAdapter, PromptTuningConfig

__all__ = ["PromptEncoderConfig", "PromptEncoder", "PTuningAdapter", "PTuning"]

_TYPES = ("MLP", "LSTM")


@dataclass
class PromptEncoderConfig(PeftConfigBase):
    """P-tuning settings, with HF PEFT's field names and defaults (``peft.PromptEncoderConfig``).

    Args:
        num_virtual_tokens: how many virtual tokens go before the input (required, > 0).
        encoder_reparameterization_type: ``"MLP"`` (three linear layers, ``encoder_num_layers`` ignored as in
            PEFT) or ``"LSTM"`` (a bidirectional LSTM of ``encoder_num_layers`` layers, then two linear layers).
        encoder_hidden_size: the encoder's hidden width; None: the embedding width (PEFT's default).
        encoder_num_layers: the LSTM's layers.
        encoder_dropout: the LSTM's dropout between its layers (PEFT's MLP has none).
        token_dim: the embedding width; None: read off the input embedding (must match it when set).
        num_transformer_submodules: 1 (decoder-only and encoder models); 2 (encoder-decoder) is refused.
        num_attention_heads, num_layers: PEFT bookkeeping (not used).
        target_modules: the input embedding; None: found in the graph, as for prompt tuning.

    Example:
        >>> import fxpeft
        >>> from fxpeft.zoo import functional_lm
        >>> model, args, _ = functional_lm()
        >>> config = fxpeft.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16)
        >>> gm = fxpeft.rewrite(fxpeft.trace(model), config)
        >>> tuple(gm(*args).shape), tuple(model(*args).shape)
        ((2, 15, 64), (2, 12, 64))
    """

    num_virtual_tokens: int | None = None
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None


def _kind(value: Any) -> str:
    """``"MLP"``/``"LSTM"`` from a string or PEFT's enum."""
    return str(getattr(value, "value", value)).upper()


class PromptEncoder(nn.Module):
    """PEFT's ``PromptEncoder`` as the adapter's shared state: ``forward()`` gives the prompt rows ``[NV, dim]``.

    Submodule names are PEFT's (``embedding``, ``lstm_head``, ``mlp_head``), so its weights copy over by name.

    Attributes:
        kind: ``"MLP"`` or ``"LSTM"``; ``"FIXED"`` once a file's rows are loaded (the heads are gone: PEFT's
            inference form, the rows being ``embedding.weight``).
        sample_vocab: always False (prompt tuning's insert asks; P-tuning draws no vocabulary rows).
    """

    def __init__(self, nv: int, dim: int, hidden: int, kind: str, num_layers: int, dropout: float,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.kind = kind
        self.sample_vocab = False
        kw = {"dtype": dtype, "device": device}
        self.embedding = nn.Embedding(nv, dim, **kw)
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw),
                                          nn.ReLU(), nn.Linear(hidden, dim, **kw))

    def forward(self) -> torch.Tensor:
        rows = self.embedding.weight  # = embedding(arange(NV)): [NV, dim]
        if self.kind == "LSTM":
            rows = self.lstm_head(rows[None])[0][0]  # one sequence of NV steps: [1, NV, dim] -> [NV, 2*hidden]
        if self.kind != "FIXED":
            rows = self.mlp_head(rows)  # [NV, dim]
        return rows

    def fix(self, rows: torch.Tensor) -> None:
        """Make the prompt ``rows`` as they are (a file's encoder output): PEFT's inference form."""
        with torch.no_grad():
            self.embedding.weight.copy_(rows)
        for head in ("lstm_head", "mlp_head"):
            if hasattr(self, head):
                delattr(self, head)
        self.kind = "FIXED"


class PTuningAdapter(PromptTuningAdapter):
    """Marks the input embedding where the prompt goes in; holds the gate (the encoder is :class:`PromptEncoder`).

    Attributes:
        num_virtual_tokens / token_dim: the prompt's shape.
        encoder: the encoder settings written back to files (PEFT's field names).
    """

    method = "p_tuning"

    def __init__(self, site: Site, adapter_name: str, config: PromptEncoderConfig) -> None:
        AdapterModule.__init__(self, site.name, adapter_name)  # prompt tuning's reads its init field, absent here
        self.num_virtual_tokens = config.num_virtual_tokens
        self.token_dim = site.weight_shape[1]
        self.encoder = {"encoder_reparameterization_type": config.encoder_reparameterization_type,
                        "encoder_hidden_size": config.encoder_hidden_size or self.token_dim,
                        "encoder_num_layers": config.encoder_num_layers, "encoder_dropout": config.encoder_dropout}
        self.switch = PromptSwitch()


def _positive(name: str, v: Any) -> None:
    if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")


@PeftRegistry.register("p_tuning")
class PTuning(PromptTuning):
    """PEFT's ``P_TUNING``: prompt tuning's graph edit, the rows computed by a :class:`PromptEncoder`."""

    config_cls = PromptEncoderConfig
    display_name = "P-tuning"
    color = ("#d0bfff", "#5f3dc4")
    spec_aliases = {"nv": "num_virtual_tokens", "type": "encoder_reparameterization_type",
                    "hidden": "encoder_hidden_size"}

    @classmethod
    def validate_config(cls, config: PromptEncoderConfig) -> None:
        # the prompt's own fields are prompt tuning's: checked by its rules
        PromptTuning.validate_config(PromptTuningConfig(
            num_virtual_tokens=config.num_virtual_tokens, token_dim=config.token_dim,
            num_transformer_submodules=config.num_transformer_submodules,
            num_attention_heads=config.num_attention_heads, num_layers=config.num_layers))
        if _kind(config.encoder_reparameterization_type) not in _TYPES:
            raise ConfigError(f"encoder_reparameterization_type={config.encoder_reparameterization_type!r} is not "
                              f"one of {list(_TYPES)}")
        if config.encoder_hidden_size is not None:
            _positive("encoder_hidden_size", config.encoder_hidden_size)
        _positive("encoder_num_layers", config.encoder_num_layers)
        p = config.encoder_dropout
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1):
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {p!r}")

    @classmethod
    def config_from_peft(cls, fields: dict[str, Any]) -> PromptEncoderConfig:
        return config_from_fields(cls, fields)

    @classmethod
    def fill_defaults(cls, config: PromptEncoderConfig, model_type: str | None) -> PromptEncoderConfig:
        config = copy.copy(config)
        config.encoder_reparameterization_type = _kind(config.encoder_reparameterization_type)
        return config

    @classmethod
    def shared_state(cls, config: PromptEncoderConfig, sites: list[Site], adapter_name: str, dtype: torch.dtype,
                     device: torch.device) -> PromptEncoder:
        # PEFT keeps the encoder in fp32 and casts the prompt to the embeddings' dtype in forward
        held = adapter_dtype(torch.empty((), dtype=dtype), config.keep_base_dtype)
        dim = sites[0].weight_shape[1]
        if config.encoder_reparameterization_type == "MLP" and config.encoder_num_layers != 2:
            warnings.warn(f"encoder_num_layers={config.encoder_num_layers} is ignored for the MLP encoder (as in "
                          "PEFT): it always has 3 linear layers")
        return PromptEncoder(config.num_virtual_tokens, dim, config.encoder_hidden_size or dim,
                             config.encoder_reparameterization_type, config.encoder_num_layers,
                             float(config.encoder_dropout), held, device)

    @classmethod
    def build(cls, site: Site, config: PromptEncoderConfig, adapter_name: str, weight: torch.Tensor) -> PTuningAdapter:
        return PTuningAdapter(site, adapter_name, config)

    @classmethod
    def prompt_source(cls, emit: Emit, shared: PromptEncoder) -> tuple[fx.Node, torch.dtype]:
        return emit.call_shared(label="prompt_encoder"), shared.embedding.weight.dtype

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def shared_tensors(cls, shared: PromptEncoder) -> dict[str, torch.Tensor]:
        # PEFT saves the encoder's output, computed without dropout
        training = shared.training
        shared.eval()
        try:
            with torch.no_grad():
                return {_KEY: shared()}
        finally:
            shared.train(training)

    @classmethod
    def load_shared_tensors(cls, shared: PromptEncoder, tensors: dict[str, torch.Tensor]) -> None:
        if shared.kind != "FIXED":
            warnings.warn("a P-tuning file holds the prompt encoder's output, not the encoder: the prompt is now "
                          "the file's rows (the MLP/LSTM heads are dropped, as in PEFT's inference mode); training "
                          "tunes these rows directly. Start from a fresh adapter to train an encoder")
        shared.fix(tensors[_KEY])

    @classmethod
    def config_fields(cls, adapters: dict[str, PTuningAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        (ad,) = adapters.values()
        return {"num_virtual_tokens": ad.num_virtual_tokens, "token_dim": ad.token_dim,
                "num_transformer_submodules": 1, **ad.encoder}
