"""Trainable tokens: train a few rows of an embedding, interchangeable with HF PEFT's ``TrainableTokensConfig`` and
with LoRA's ``trainable_token_indices``. One file: config, sites, nodes, fold, and PEFT's file format.

The embedding reads its weight with the chosen rows replaced by the trained ones (PEFT's ``index_copy``)::

    W' = W.index_copy(0, idx, delta)          idx [n] int64;  delta [n, dim]   (the trained rows themselves)

so the gradient reaches only ``delta``, and every other row is the base's, bit for bit. While the adapter is off
or merged the graph writes back the rows the weight holds (``where(gate, delta, W[idx])``): the base outputs
exactly, and no double application once the rows are merged.

**Tied weights.** A weight the embedding shares with another call site (GPT-2's ``lm_head``) is adapted there too,
with the same ``delta`` (one parameter, counted once), as PEFT ties a ``TrainableTokensLayer`` to the embedding's.

**Beside LoRA.** ``LoraConfig(trainable_token_indices=[...] or {module: [...]})`` asks for these adapters beside
LoRA's (:meth:`fxpeft.Method.companions`): the rewrite injects both under one adapter name, and one file holds
both, as PEFT's ``TrainableTokensWrapper`` lays it out.

**Fold** writes the rows into the weight (exact); **unfold** writes back the rows it held when the adapter was
built (PEFT's ``trainable_tokens_original``).

PEFT's file layout (keys under ``base_model.model.<site>.``)::

    trainable_tokens_delta                  [n, dim]   (TrainableTokensConfig; a tied module repeats it)
    token_adapter.trainable_tokens_delta    [n, dim]   (LoRA's trainable_token_indices; tied modules not saved)
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import AdapterFileError, ConfigError, UnsupportedSiteError
from fxpeft.copies import FullCopy
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Site, _attr
from fxpeft.tags import Role, graph_info

from .lora import adapter_dtype

__all__ = ["TrainableTokensConfig", "TrainableTokensAdapter", "TrainableTokens", "check_token_indices",
           "check_trainable_token_indices", "token_companions"]

aten = torch.ops.aten

_KEY = "trainable_tokens_delta"
_WRAPPED_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's TrainableTokensWrapper (LoRA's companion)


@dataclass
class TrainableTokensConfig(PeftConfigBase):
    """Trainable-tokens settings, with HF PEFT's field names and defaults.

    Args:
        token_indices: the rows (token ids) to train; distinct, in ``[0, num_embeddings)``.
        target_modules: the embedding(s) to adapt; default: the model's input embedding (PEFT's
            ``get_input_embeddings``; for other models the one embedding that reads a graph input, else
            ``embed_tokens``). Call sites that share the embedding's weight (a tied ``lm_head``) come along.
        init_weights: True (the rows start as the embedding's: no change until trained) or False (random rows).
        wrapped: fxpeft: the adapter stands in PEFT's ``TrainableTokensWrapper`` (set by LoRA's
            ``trainable_token_indices``; file keys under ``token_adapter.``, tied copies not saved). Leave False.
        exclude_modules, keep_base_dtype: as for every method.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Embedding(10, 4)))
        >>> gm = fxpeft.rewrite(gm, fxpeft.TrainableTokensConfig(token_indices=[3, 7], target_modules=["0"]))
        >>> sorted((n, tuple(p.shape)) for n, p in gm.named_parameters() if p.requires_grad)
        [('0.trainable_tokens_default.trainable_tokens_delta', (2, 4))]
    """

    token_indices: list[int] = field(default_factory=list)
    init_weights: bool = True
    wrapped: bool = field(default=False, repr=False)


def check_token_indices(value: Any, name: str = "token_indices") -> list[int]:
    """``value`` as a list of distinct non-negative ints, else :class:`ConfigError` naming the field and the fix."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ConfigError(f"{name} must be a list of token ids (ints), got {value!r}")
    if not value:
        raise ConfigError(f"{name} is empty; list the token ids to train, e.g. {name}=[0, 5]")
    negative = sorted(i for i in value if i < 0)
    if negative:
        raise ConfigError(f"{name} holds negative token ids {negative[:5]}; token ids count from 0 (write "
                          "num_embeddings - 1 for the last row)")
    seen, twice = set(), []
    for i in value:
        (twice.append(i) if i in seen else seen.add(i))
    if twice:
        raise ConfigError(f"{name} lists token ids {sorted(set(twice))[:5]} more than once; each row is trained "
                          "once (PEFT's index_copy would keep an arbitrary copy): drop the repeats")
    return list(value)


def token_companions(indices: Any, keep_base_dtype: bool = False) -> list[TrainableTokensConfig]:
    """The trainable-tokens configs LoRA's ``trainable_token_indices`` asks for: a list trains rows of the input
    embedding; a dict ``{module: [ids]}`` the rows of each named embedding (PEFT's matching: a name suffix)."""
    if indices is None:
        return []
    per = indices.items() if isinstance(indices, dict) else [(None, indices)]
    return [TrainableTokensConfig(token_indices=list(ids), target_modules=None if name is None else [name],
                                  keep_base_dtype=keep_base_dtype, wrapped=True) for name, ids in per]


def check_trainable_token_indices(value: Any) -> None:
    """LoRA's ``trainable_token_indices``: None, a list of token ids, or ``{module name: [token ids]}``."""
    if value is None:
        return
    if isinstance(value, dict):
        if not value:
            raise ConfigError("trainable_token_indices is an empty dict; name an embedding and its token ids, e.g. "
                              "{'embed_tokens': [0, 5]}")
        for name, ids in value.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"trainable_token_indices keys are module names, got {name!r}")
            check_token_indices(ids, f"trainable_token_indices[{name!r}]")
        return
    check_token_indices(value, "trainable_token_indices")


class TrainableTokensAdapter(AdapterModule):
    """The trained rows of one embedding (PEFT's ``trainable_tokens_delta``), their ids (``token_indices``), and
    the rows the weight held at build time (``trainable_tokens_original``, for unfold). A site tied to another's
    weight holds the same ``trainable_tokens_delta`` parameter (``tied``)."""

    method = "trainable_tokens"

    def __init__(self, site: Site, adapter_name: str, indices: list[int], original: torch.Tensor,
                 delta: nn.Parameter, wrapped: bool, tied: bool) -> None:
        super().__init__(site.name, adapter_name)
        self.kind, self.wrapped, self.tied = site.kind, bool(wrapped), bool(tied)
        self.companion = self.wrapped  # written under LoRA's config (trainable_token_indices)
        self.trainable_tokens_delta = delta  # [n, dim]
        self.register_buffer("token_indices", torch.tensor(indices, dtype=torch.int64, device=delta.device),
                             persistent=False)  # [n]
        self.register_buffer("trainable_tokens_original", original, persistent=False)  # [n, dim], the weight's dtype

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.token_indices.tolist())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tokens={len(self.token_indices)}" + (", tied" if self.tied else "")


def _rows_of(site: Site) -> int:
    """The number of token rows of the site's weight (an embedding's ``num_embeddings``; a tied head's outputs)."""
    return site.weight_shape[0]


def input_placeholder(node) -> fx.Node | None:
    """The graph input ``node`` is, through a few views (GPT-2 flattens ``input_ids`` first), or None."""
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            return node
        if node.op not in ("call_function", "call_method") or not node.args:
            return None
        node = node.args[0]
    return None


def _input_embedding(gm: fx.GraphModule, sites: dict[str, Site]) -> str:
    """PEFT's default target: the model's input embedding (recorded at trace for transformers models); otherwise
    the one embedding whose indices are a graph input (through views), else PEFT's fallback ``embed_tokens``."""
    name = graph_info(gm).input_embedding
    if name in sites:
        return name
    found = [s.name for s in sites.values()
             if s.kind == "embedding" and any(input_placeholder(c.input) is not None for c in s.calls)]
    return found[0] if len(found) == 1 else "embed_tokens"


@PeftRegistry.register("trainable_tokens")
class TrainableTokens(Method):
    """PEFT's ``TRAINABLE_TOKENS``: the embedding (and the call sites of its tied weight) reads its weight with the
    chosen rows replaced by trained ones; on its own, or beside LoRA (``trainable_token_indices``)."""

    config_cls = TrainableTokensConfig
    display_name = "TrainableTokens"
    color = ("#fff3bf", "#e67700")
    site_kinds = frozenset({"embedding", "linear"})  # linear: only a call site tied to an adapted embedding
    spec_aliases = {"tokens": "token_indices", "init": "init_weights"}

    @classmethod
    def validate_config(cls, config: TrainableTokensConfig) -> None:
        check_token_indices(config.token_indices)
        for name in ("init_weights", "wrapped"):
            if not isinstance(getattr(config, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(config, name)!r}")

    @classmethod
    def fill_defaults(cls, config: TrainableTokensConfig, model_type: str | None) -> TrainableTokensConfig:
        config = copy.copy(config)
        config._tied_rows = {}  # this rewrite's trained rows by base weight: tied sites share one parameter
        return config

    @classmethod
    def select_sites(cls, gm: fx.GraphModule, config: TrainableTokensConfig, sites: dict[str, Site],
                     select) -> list[Site]:
        if config.target_modules is None:
            config = dataclasses.replace(config, target_modules=[_input_embedding(gm, sites)])
        chosen = select(config)
        weight = {s.name: id(gm.get_parameter(s.weight)) for s in sites.values()}
        embedded = {weight[s.name] for s in chosen if s.kind == "embedding"}
        untied = [s.name for s in chosen if s.kind == "linear" and weight[s.name] not in embedded]
        if untied:
            raise UnsupportedSiteError(
                f"trainable tokens adapt embeddings; {untied[:3]} are linear sites that share no weight with a targeted "
                "embedding. Target the embedding (a tied output head comes along), or use another method there")
        names = {s.name for s in chosen}
        tied = {s.name for s in sites.values() if s.name not in names and s.kind in ("embedding", "linear")
                and weight[s.name] in embedded}
        copied = {id(_attr(gm, path)) for m in gm.modules() if isinstance(m, FullCopy) for path in m.bases.values()}
        whole = sorted(n for n in names | tied if weight[n] in copied)
        if whole:  # PEFT refuses an embedding both in modules_to_save and in trainable_token_indices
            raise UnsupportedSiteError(f"{whole[:3]} are trained whole (modules_to_save); train the embedding whole or "
                                       "a few of its rows, not both: drop it from modules_to_save")
        return [s for s in sites.values() if s.name in names | tied]  # graph order

    @classmethod
    def check_site(cls, site: Site, config: TrainableTokensConfig) -> str | None:
        why = super().check_site(site, config)
        if why is None and site.kind == "linear" and site.fan_in_fan_out:
            why = "a tied weight read as [in, out] (x @ W): its rows are not token rows"
        return why

    @classmethod
    def check_selection(cls, config: TrainableTokensConfig, sites: list[Site]) -> None:
        for s in sites:
            outside = sorted(i for i in config.token_indices if i >= _rows_of(s))
            if outside:
                raise ConfigError(f"token_indices {outside[:5]} are outside the vocabulary of {s.name!r} "
                                  f"({_rows_of(s)} rows, ids 0..{_rows_of(s) - 1}); resize the embedding first "
                                  "(model.resize_token_embeddings) and trace it again")

    @classmethod
    def build(cls, site: Site, config: TrainableTokensConfig, adapter_name: str,
              weight: torch.Tensor) -> TrainableTokensAdapter:
        idx = torch.tensor(config.token_indices, dtype=torch.int64, device=weight.device)
        original = weight.detach().index_select(0, idx).clone()  # [n, dim]
        shared = getattr(config, "_tied_rows", {})  # id(weight) -> [rows, whether an embedding owns them]
        if id(weight) not in shared:
            dtype = adapter_dtype(weight, config.keep_base_dtype)
            rows = original if config.init_weights else torch.randn(original.shape, dtype=weight.dtype,
                                                                    device=weight.device)
            shared[id(weight)] = [nn.Parameter(rows.to(dtype).clone()), False]
        entry = shared[id(weight)]
        tied = site.kind != "embedding" or entry[1]  # the first embedding of the weight owns the rows; others follow
        entry[1] = entry[1] or not tied
        return TrainableTokensAdapter(site, adapter_name, list(config.token_indices), original, entry[0],
                                      config.wrapped, tied)

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: TrainableTokensAdapter) -> None:
        call = emit.call
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        idx = emit.param("token_indices", Role.PARAM, label="token_indices")
        delta = emit.param("trainable_tokens_delta", Role.PARAM, label="trainable_tokens_delta")
        gate = emit.param("gate", Role.GATE, label="gate")
        if adapter.trainable_tokens_delta.dtype != base_dtype:
            delta = emit.cast(delta, base_dtype)
        # the rows the weight holds now (the base's, or the merged delta's): what the call reads while off or merged.
        # A read of its own, so the merge passes do not take it for another call site of the weight.
        held = emit.op(aten.index_select.default, emit.weight(own=True), 0, idx, label="held_rows")  # [n, dim]
        rows = emit.op(aten.where.self, gate, delta, held, label="rows")  # [n, dim]
        if call.weight_node is not None:  # the call reads W' where it read W
            adapted = emit.op(aten.index_copy.default, emit.weight(), 0, idx, rows, role=Role.OUT, replaces=0,
                              label="adapted_weight")
            emit.replace_input(call.weight_node, adapted)
            return
        # a call_module (symbolic_trace): the same call on W', in place of the module's output while on
        adapted = emit.op(aten.index_copy.default, emit.weight(own=True), 0, idx, rows, label="adapted_weight")
        if site.kind == "embedding":
            pad = -1 if site.padding_idx is None else site.padding_idx
            new = emit.op(aten.embedding.default, adapted, call.input, pad, label="embedding")
        else:
            new = emit.op(aten.linear.default, call.input, adapted, emit.bias(), label="linear")
        out = emit.op(aten.where.self, gate, new, call.node, role=Role.OUT, replaces=2, label="out")
        emit.replace_output(out)

    @classmethod
    def fold(cls, adapter: TrainableTokensAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        rows = adapter.trainable_tokens_delta.detach().to(weight.dtype)
        return weight.index_copy(0, adapter.token_indices.to(weight.device), rows.to(weight.device)), bias

    @classmethod
    def unfold(cls, adapter: TrainableTokensAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        rows = adapter.trainable_tokens_original.to(weight.dtype)
        return weight.index_copy(0, adapter.token_indices.to(weight.device), rows.to(weight.device)), bias

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def _key(cls, wrapped: bool, site: Site) -> str | None:
        """The site's key suffix; None for a tied head under LoRA (PEFT's wrapper saves only the embedding)."""
        if not wrapped:
            return _KEY
        return None if site.kind == "linear" else _WRAPPED_KEY

    @classmethod
    def site_shapes(cls, config: TrainableTokensConfig, site: Site) -> dict[str, tuple[int, ...]]:
        key = cls._key(config.wrapped, site)
        return {} if key is None else {key: (len(config.token_indices), site.weight_shape[1])}

    @classmethod
    def site_tensors(cls, adapter: TrainableTokensAdapter, site: Site) -> dict[str, torch.Tensor]:
        key = cls._key(adapter.wrapped, site)
        return {} if key is None else {key: adapter.trainable_tokens_delta.detach()}

    @classmethod
    def load_site_tensors(cls, adapter: TrainableTokensAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        if adapter.tied:  # PEFT repeats the embedding's rows under a tied module: the embedding's copy is read
            return
        with torch.no_grad():
            adapter.trainable_tokens_delta.copy_(tensors[cls._key(adapter.wrapped, site)])

    @classmethod
    def site_settings(cls, config: TrainableTokensConfig, site: Site) -> dict[str, Any]:
        return {"token_indices": tuple(config.token_indices), "wrapped": config.wrapped}

    @classmethod
    def adapter_settings(cls, adapter: TrainableTokensAdapter) -> dict[str, Any]:
        return {"token_indices": adapter.indices, "wrapped": adapter.wrapped}

    @classmethod
    def config_fields(cls, adapters: dict[str, TrainableTokensAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        indices = {m.indices for m in adapters.values()}
        if len(indices) > 1:
            raise AdapterFileError(f"the adapter's embeddings train different token ids ({sorted(indices)}); one PEFT "
                              "TrainableTokensConfig has one token_indices: give each its own adapter name")
        # PEFT targets the embedding; the tied sites come along (written by their full names: exact)
        return {"token_indices": list(indices.pop()), "init_weights": True,
                "target_modules": sorted(n for n, m in adapters.items() if not m.tied)}

    @classmethod
    def companion_fields(cls, adapters: dict[str, TrainableTokensAdapter], sites: dict[str, Site]) -> dict[str, Any]:
        # LoRA's field: {embedding: ids}, by full name (PEFT matches the keys as name suffixes)
        return {"trainable_token_indices": {n: list(m.indices) for n, m in adapters.items() if not m.tied}}
