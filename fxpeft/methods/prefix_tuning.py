"""Prefix tuning: learned keys and values prepended at every attention node, interchangeable with HF PEFT's
``PrefixTuningConfig`` (``PREFIX_TUNING``, https://huggingface.co/papers/2101.00190). One file: config, the graph
edit, and PEFT's file format.

PEFT hands the model a ``past_key_values`` cache holding ``NV`` learned positions per layer, and prepends ``NV``
ones to the attention mask. The model then treats them as an earlier prompt: the real tokens' positions start at
``NV`` (RoPE, position embeddings), the cached keys get no RoPE, and each query sees every prefix position. In the
graph the same thing is a structural edit, found without any per-architecture code:

* at every ``aten.scaled_dot_product_attention`` node, in execution order (layer ``l`` is the ``l``-th node), the
  layer's prefix ``[B, H_kv, NV, D]`` goes before the keys and the values (``constant_pad_nd`` + ``slice_scatter``,
  after the keys' RoPE). Where the graph repeats grouped K/V to the query heads (``repeat_kv``), the prefix is
  repeated the same way; with ``enable_gqa=True`` it is read grouped;
* the attention mask gets ``NV`` leading "attend" columns (``constant_pad_nd``: ``True`` for a boolean mask, ``0``
  for an additive one): the prefix is always visible, the causal and padding parts are unchanged. An ``is_causal``
  call (what :class:`~passes.attention.NormalizeAttention` leaves) keeps its flag: the query gets ``NV`` leading
  dummy rows, so the kernel's top-left causal mask becomes PEFT's bottom-right one over ``NV + T`` keys, and the
  dummy rows are sliced off the output;
* positions: every ``arange`` over the sequence dim that feeds positions (``cache_position``, ``position_ids``, the
  rotary or position embedding) is shifted by ``NV`` where it leaves the attention-mask computation, which keeps
  its own indices.

**Output layout.** As PEFT's prefix tuning: logits ``[B, T, V]`` (no virtual positions), the loss over the real
tokens. With the adapter off (``disable_adapters``, ``set_adapter`` to another adapter) the prefix has no rows: the
graph computes exactly the base model. The choice is a Python flag on the adapter's
:class:`~fxpeft.methods.prompt_tuning.PromptSwitch`, as for prompt tuning: ``torch.compile`` guards on it (no graph
break) and :func:`fxpeft.export` writes a ``.pt2`` with the prefix in.

**Supported graphs**: export graphs (``fxpeft.trace`` with example inputs) with an input embedding and SDPA
attention nodes whose keys are ``[B, heads, S, head_dim]``, and whose positions come from an ``arange`` over the
sequence (Llama, GPT-2 and most HF decoders in transformers 5). Refused with a typed error, the graph unchanged: a
symbolic_trace graph (no shapes), no attention node (a matmul + softmax attention is named), no position
computation to shift, layers of different head sizes, ``token_dim`` / ``num_attention_heads`` / ``num_layers`` that
do not match the graph (a file of another architecture), a second prefix adapter. Merging is refused
(:class:`~fxpeft.MergeError`): a prefix is not a weight change.

PEFT's file layout: one tensor ``prompt_embeddings [NV, num_layers * 2 * token_dim]`` (per row, layer by layer, the
keys then the values, each ``[H_kv, head_dim]`` flattened); with ``prefix_projection`` the file holds the encoder's
*output*, as PEFT writes it. On GQA models ``token_dim = head_dim * num_key_value_heads`` and
``num_attention_heads`` is the number of KV heads, as PEFT sets them. ``adapter_config.json`` has no
``target_modules``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import ConfigError, MergeError, UnsupportedSiteError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Site
from fxpeft.tags import Role, get_tag
from fxpeft.passes.attention import _ancestors, _same, _sdpa_arguments, _unrepeat

from .lora import adapter_dtype
from .prompt_tuning import _KEY, PromptState, PromptSwitch, _graph_input, _is_check

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "PrefixTuningAdapter", "PrefixTuning"]

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)
#: ops that carry position values through unchanged (a shift of their input shifts their output by the same)
_KEEPS_POSITIONS = frozenset({aten.unsqueeze.default, aten.slice.Tensor, aten.expand.default, aten.view.default,
                              aten.reshape.default, aten._unsafe_view.default, aten.clone.default, aten.alias.default,
                              aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default,
                              aten.add.Tensor, aten.add.Scalar})
_SOFTMAX = (aten.softmax.int, aten._softmax.default, torch.softmax, torch.nn.functional.softmax)


@dataclass
class PrefixTuningConfig(PeftConfigBase):
    """Prefix-tuning settings, with HF PEFT's field names and defaults (``peft.PrefixTuningConfig``).

    Args:
        num_virtual_tokens: how many learned key/value positions go before the input at each layer (required, > 0).
        token_dim: the width of one layer's keys, ``H_kv * head_dim``; None: read off the attention nodes (must
            match them when set: PEFT's value on GQA models is ``head_dim * num_key_value_heads``).
        num_attention_heads: the keys' heads (the KV heads on GQA models); None: read off the graph.
        num_layers: the number of attention nodes; None: counted in the graph (must match when set).
        num_transformer_submodules: 1 (decoder-only models); 2 (encoder-decoder) is refused.
        prefix_projection: compute the prefix with PEFT's two-layer MLP (``embedding [NV, token_dim]``, then
            ``Linear -> Tanh -> Linear`` to ``num_layers * 2 * token_dim``) instead of learning it directly.
        encoder_hidden_size: the MLP's hidden width; None: ``token_dim`` (PEFT's default).
        init_weights: None (random normal rows, as ``nn.Embedding``) or ``"zero"`` (PEFT's zero init of the
            prefix, or of the MLP's last layer; note that a zero prefix still takes attention weight).

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.zoo import tiny_llama
        >>> model, args, kwargs = tiny_llama(layers=1, seq=8)
        >>> gm = fxpeft.rewrite(fxpeft.trace(model, args, kwargs), fxpeft.PrefixTuningConfig(num_virtual_tokens=3))
        >>> tuple(gm(**kwargs)[0].shape), fxpeft.get_nb_trainable_parameters(gm)[0]  # NV x layers x 2 x (2 x 16)
        ((2, 8, 256), 192)
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None


class PrefixEncoder(nn.Module):
    """PEFT's ``PrefixEncoder`` as the adapter's shared state: ``forward()`` gives the prefix rows
    ``[NV, num_layers * 2 * token_dim]``.

    Submodule names are PEFT's (``embedding``, ``transform``), so its weights copy over by name.

    Attributes:
        projection: the rows come from the MLP (``prefix_projection``); False once a file's rows are loaded
            (PEFT's inference form: the rows are ``embedding.weight``).
    """

    def __init__(self, nv: int, token_dim: int, width: int, hidden: int, projection: bool, zero: bool,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.projection = projection
        kw = {"dtype": dtype, "device": device}
        self.embedding = nn.Embedding(nv, token_dim if projection else width, **kw)
        if projection:
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden, **kw), nn.Tanh(), nn.Linear(hidden, width, **kw))
        if zero:  # PEFT's init_weights="zero": the rows (or the MLP's output layer) start at zero
            last = self.transform[-1] if projection else self.embedding
            for p in last.parameters():
                nn.init.zeros_(p)

    def forward(self) -> torch.Tensor:
        rows = self.embedding.weight  # = embedding(arange(NV)), as PEFT computes it
        return self.transform(rows) if self.projection else rows  # [NV, num_layers * 2 * token_dim]

    def fix(self, rows: torch.Tensor) -> None:
        """Make the prefix ``rows`` as they are (a file's encoder output): PEFT's inference form."""
        if self.projection:
            del self.transform
            self.embedding = nn.Embedding(*rows.shape, dtype=self.embedding.weight.dtype,
                                          device=self.embedding.weight.device)
            self.projection = False
        with torch.no_grad():
            self.embedding.weight.copy_(rows)


class PrefixTuningAdapter(AdapterModule):
    """Marks the input embedding the prefix adapter hangs off; holds the on/off gate (the prefix is
    :class:`PrefixEncoder`).

    Attributes:
        num_virtual_tokens / num_layers / token_dim / num_attention_heads: the prefix's shape.
        encoder: the encoder settings written back to files (PEFT's field names).
    """

    method = "prefix_tuning"

    def __init__(self, site: Site, adapter_name: str, config: PrefixTuningConfig) -> None:
        super().__init__(site.name, adapter_name)
        self.num_virtual_tokens = config.num_virtual_tokens
        self.num_layers = config.num_layers
        self.token_dim = config.token_dim
        self.num_attention_heads = config.num_attention_heads
        self.encoder = {"prefix_projection": bool(config.prefix_projection),
                        "encoder_hidden_size": config.encoder_hidden_size or config.token_dim,
                        "init_weights": config.init_weights}
        self.switch = PromptSwitch()

    def gate_changed(self, on: bool) -> None:
        self.switch.on = on  # the graph's choice of prefix rows follows the gate


# ------------------------------------------------------------------------------------------- graph analysis

@dataclass
class _Layer:
    """One attention node and the shape of its prefix."""

    node: fx.Node
    kv_heads: int    # the prefix's heads (PEFT's num_attention_heads)
    head_dim: int
    repeat: int      # the graph repeats each KV head this many times before the node (repeat_kv); 1: none


def _unprefixed(node: Any) -> Any:
    """The graph's own value behind this method's edit (the keys before the prefix went in), so that a prefix-tuned
    graph reads as its base (saving checks that the written config resolves on the graph)."""
    while isinstance(node, fx.Node) and (tag := get_tag(node)) is not None and tag.method == PrefixTuningAdapter.method \
            and tag.replaces is not None:
        node = node.args[tag.replaces]
    return node


def _layer(node: fx.Node) -> _Layer:
    a = _sdpa_arguments(node)
    key = _unprefixed(a["key"])
    k = key.meta.get("val") if isinstance(key, fx.Node) else None
    if not isinstance(k, torch.Tensor) or k.dim() != 4 or not all(isinstance(d, int) for d in k.shape[1::2]):
        raise UnsupportedSiteError(f"prefix tuning: the attention node {node.name!r} does not take keys shaped "
                                   "[batch, heads, seq, head_dim] with fixed heads and head size")
    if _unprefixed(a["value"]) is key:
        raise UnsupportedSiteError(f"prefix tuning: the attention node {node.name!r} reads one tensor as its keys and "
                                   "values; the prefix has separate keys and values")
    grouped = None if a["enable_gqa"] else _unrepeat(key)
    if grouped is not None:  # keys repeated to the query heads in the graph: the prefix is repeated the same way
        kv, n, _ = grouped
        return _Layer(node, int(kv.meta["val"].shape[1]), int(k.shape[3]), n)
    return _Layer(node, int(k.shape[1]), int(k.shape[3]), 1)


def _attention_layers(gm: fx.GraphModule) -> list[_Layer]:
    """Every SDPA node in execution order, with its prefix shape; a typed error naming what is not there."""
    nodes = list(gm.graph.nodes)
    sdpa = [n for n in nodes if n.op == "call_function" and n.target is _SDPA]
    if not sdpa:
        soft = next((n for n in nodes if n.op in ("call_function", "call_method")
                     and (n.target in _SOFTMAX or n.target == "softmax")), None)
        if soft is not None:
            raise UnsupportedSiteError(f"prefix tuning: the graph computes attention as matmul + softmax (node "
                                       f"{soft.name!r}), not with aten.scaled_dot_product_attention, the attention "
                                       "node prefix tuning extends; load the model with attn_implementation='sdpa' "
                                       "and trace it again")
        raise UnsupportedSiteError("prefix tuning: no attention node (aten.scaled_dot_product_attention) was found "
                                   "in the graph; trace a model with attention, with example inputs")
    layers = [_layer(n) for n in sdpa]
    if len({(la.kv_heads, la.head_dim) for la in layers}) != 1:
        raise UnsupportedSiteError("prefix tuning: the attention nodes have different key shapes "
                                   f"{sorted({(la.kv_heads, la.head_dim) for la in layers})} (heads, head_dim); "
                                   "PEFT's prefix has one token_dim for every layer")
    return layers


def _position_edges(gm: fx.GraphModule, ids: fx.Node, layers: list[_Layer]) -> list[tuple[fx.Node, fx.Node]]:
    """``(value, user)`` pairs where a position value derived from an ``arange`` over the sequence dim reaches a
    user outside the attention masks' computation: the edges to shift by ``NV``.

    The masks keep their own indices (the prefix columns are added to the mask itself), so a position node they
    share is shifted only on its way to the other users (the rotary or position embedding).
    """
    seq = ids.meta["val"].shape[-1]
    masks: set[fx.Node] = set()
    for la in layers:
        mask = _sdpa_arguments(la.node)["attn_mask"]
        if isinstance(mask, fx.Node):
            masks.update(_ancestors(mask))
    positions: list[fx.Node] = []
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n.op != "call_function" or not isinstance(val, torch.Tensor) or val.dim() != 1:
            continue
        step = n.args[2] if n.target is aten.arange.start_step else 1
        if n.target in _ARANGES and step == 1 and _same(val.shape[0], seq) and not val.dtype.is_floating_point:
            positions.append(n)
    found, edges = set(positions), []
    while positions:  # position values, through the ops that keep them positions, inside the mask computation
        p = positions.pop()
        top = p in masks or p.target in _ARANGES  # where a value leaves the mask computation, unshifted so far
        for u in p.users:
            if u in masks:
                keeps = u.target in _KEEPS_POSITIONS and u.args[0] is p and (
                    u.target not in (aten.add.Tensor, aten.add.Scalar) or isinstance(u.args[1], (int, torch.SymInt)))
                if keeps and u not in found:
                    found.add(u)
                    positions.append(u)
            elif top and not _is_check(u):
                edges.append((p, u))
    return edges


def _prefix_layout(config: PrefixTuningConfig, layers: list[_Layer]) -> tuple[int, int, int]:
    """``(num_layers, num_attention_heads, token_dim)`` of the graph; a typed error where ``config`` sets others."""
    heads, dim = layers[0].kv_heads, layers[0].head_dim
    graph = {"num_layers": len(layers), "num_attention_heads": heads, "token_dim": heads * dim}
    for name, value in graph.items():
        if getattr(config, name) not in (None, value):
            raise ConfigError(f"{name}={getattr(config, name)} does not match the graph: its {len(layers)} attention "
                              f"nodes take {heads} key heads of size {dim} (num_layers={len(layers)}, "
                              f"num_attention_heads={heads}, token_dim={heads * dim}); leave {name} unset, or load an "
                              "adapter made for this model")
    return graph["num_layers"], heads, heads * dim


def _positive(name: str, v: Any, optional: bool = True) -> None:
    if (v is None and optional) or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        return
    raise ConfigError(f"{name} must be a positive integer{' or None' if optional else ''}, got {v!r}" +
                      ("; set e.g. num_virtual_tokens=20" if name == "num_virtual_tokens" else ""))


@PeftRegistry.register("prefix_tuning")
class PrefixTuning(PromptState, Method):
    """PEFT's ``PREFIX_TUNING``: learned keys and values before the real ones at every attention node."""

    config_cls = PrefixTuningConfig
    display_name = "Prefix tuning"
    color = ("#c5f6fa", "#0b7285")
    site_kinds = frozenset({"embedding"})
    spec_aliases = {"nv": "num_virtual_tokens", "projection": "prefix_projection", "hidden": "encoder_hidden_size"}
    targets_from_graph = True
    peft_absent_fields = frozenset({"target_modules", "exclude_modules"})  # PEFT's prompt configs have neither

    @classmethod
    def validate_config(cls, config: PrefixTuningConfig) -> None:
        _positive("num_virtual_tokens", config.num_virtual_tokens, optional=False)
        for name in ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
            _positive(name, getattr(config, name))
        if config.num_transformer_submodules not in (None, 1):
            raise ConfigError(f"num_transformer_submodules={config.num_transformer_submodules!r}: fxpeft's prefix "
                              "tuning supports one transformer stack (1, decoder-only models), not encoder-decoder "
                              "prefixes")
        if not isinstance(config.prefix_projection, bool):
            raise ConfigError(f"prefix_projection must be True or False, got {config.prefix_projection!r}")
        if config.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights={config.init_weights!r} is not one of None (random) or 'zero'")
        if config.token_dim is not None and config.num_attention_heads is not None \
                and config.token_dim % config.num_attention_heads:
            raise ConfigError(f"token_dim={config.token_dim} is not a multiple of num_attention_heads="
                              f"{config.num_attention_heads}")

    @classmethod
    def fill_defaults(cls, config: PrefixTuningConfig, model_type: str | None) -> PrefixTuningConfig:
        return copy.copy(config)

    @classmethod
    def select_sites(cls, gm: fx.GraphModule, config: PrefixTuningConfig, sites: dict[str, Site],
                     select) -> list[Site]:
        chosen = cls.input_embedding_site(gm, config, sites, select)
        layers, _ = _plan(gm, chosen[0])  # refuses a graph prefix tuning cannot extend, before any change
        # the prefix's shape is the graph's: filled in here, on the rewrite's own copy of the config (see
        # fill_defaults), where the graph is at hand; a config (a file's) that sets other values is refused
        config.num_layers, config.num_attention_heads, config.token_dim = _prefix_layout(config, layers)
        config.encoder_hidden_size = config.encoder_hidden_size or config.token_dim
        return chosen

    # ---------------------------------------------------------------------------------- graph
    @classmethod
    def shared_state(cls, config: PrefixTuningConfig, sites: list[Site], adapter_name: str, dtype: torch.dtype,
                     device: torch.device) -> PrefixEncoder:
        # PEFT keeps the prefix encoder in fp32 and casts the prefix to the model's dtype in forward
        held = adapter_dtype(torch.empty((), dtype=dtype), config.keep_base_dtype)
        width = config.num_layers * 2 * config.token_dim
        return PrefixEncoder(config.num_virtual_tokens, config.token_dim, width, config.encoder_hidden_size,
                             config.prefix_projection, config.init_weights == "zero", held, device)

    @classmethod
    def build(cls, site: Site, config: PrefixTuningConfig, adapter_name: str,
              weight: torch.Tensor) -> PrefixTuningAdapter:
        return PrefixTuningAdapter(site, adapter_name, config)

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: PrefixTuningAdapter) -> None:
        cls.refuse_second(emit, adapter, PrefixTuningAdapter, "prefix")
        layers, edges = _plan(emit.gm, site)
        dtype = layers[0].node.meta["val"].dtype
        last = [n for n in emit.graph.nodes if n.op == "placeholder"][-1]
        with emit.graph.inserting_before(last.next):  # at the entry: the positions are computed early
            rows = emit.call_shared(label="prefix_encoder")  # [NV, num_layers * 2 * token_dim]
            rows = emit.module("switch", rows, label="prefix")  # [0, width] while the adapter is off
            if emit.gm.get_submodule(Method.shared_path(cls.name, adapter.adapter_name)).embedding.weight.dtype != dtype:
                rows = emit.cast(rows, dtype)
            nv = emit.op(aten.sym_size.int, rows, 0, label="num_virtual")
        for value, user in edges:  # the real tokens' positions start at NV
            with emit.graph.inserting_before(user):
                shifted = emit.op(aten.add.Tensor, value, nv, role=Role.OUT, replaces=0, label="positions_after_prefix")
            user.replace_input_with(value, shifted)
        padded_masks: dict[fx.Node, fx.Node] = {}
        for i, la in enumerate(layers):
            with emit.graph.inserting_before(la.node):
                _extend_attention(emit, la, i, rows, nv, adapter.token_dim, padded_masks)

    @classmethod
    def fold(cls, adapter: PrefixTuningAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        raise MergeError(f"prefix tuning adapter {adapter.adapter_name!r} cannot be merged: its keys and values are "
                         "extra attention positions, not a weight change, so there is nothing to fold. Keep it "
                         "unmerged, or remove it (fxpeft.remove_adapters) for the base model")

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def shared_shapes(cls, config: PrefixTuningConfig, sites: list[Site]) -> dict[str, tuple[int, ...]]:
        return {_KEY: (config.num_virtual_tokens, config.num_layers * 2 * config.token_dim)}

    @classmethod
    def shared_tensors(cls, shared: PrefixEncoder) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # PEFT saves the encoder's output (the MLP has no dropout)
            return {_KEY: shared()}

    @classmethod
    def load_shared_tensors(cls, shared: PrefixEncoder, tensors: dict[str, torch.Tensor]) -> None:
        if shared.projection:
            warnings.warn("a prefix-tuning file holds the prefix encoder's output, not the encoder: the prefix is now "
                          "the file's rows (the MLP is dropped, as in PEFT's inference mode); training tunes these "
                          "rows directly. Start from a fresh adapter to train the projection")
        shared.fix(tensors[_KEY])

    @classmethod
    def site_settings(cls, config: PrefixTuningConfig, site: Site) -> dict[str, Any]:
        return {"num_virtual_tokens": config.num_virtual_tokens}

    @classmethod
    def adapter_settings(cls, adapter: PrefixTuningAdapter) -> dict[str, Any]:
        return {"num_virtual_tokens": adapter.num_virtual_tokens}

    @classmethod
    def config_fields(cls, adapters: dict[str, PrefixTuningAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        (ad,) = adapters.values()
        # no target_modules (peft_absent_fields): the attention nodes are found again on load
        return {"num_virtual_tokens": ad.num_virtual_tokens, "token_dim": ad.token_dim, "num_layers": ad.num_layers,
                "num_attention_heads": ad.num_attention_heads, "num_transformer_submodules": 1, **ad.encoder}


def _plan(gm: fx.GraphModule, site: Site) -> tuple[list[_Layer], list[tuple[fx.Node, fx.Node]]]:
    """The attention nodes and the position edges of the graph; a typed error where prefix tuning cannot go in."""
    if len(site.calls) != 1:
        raise UnsupportedSiteError(f"prefix tuning: the input embedding {site.name!r} is called {len(site.calls)} "
                                   "times in the graph; it needs exactly one embedding of the input ids")
    ids = _graph_input(site.calls[0].input)
    val = ids.meta.get("val") if ids is not None else None
    if not isinstance(val, torch.Tensor) or val.dim() < 1:
        raise UnsupportedSiteError("prefix tuning needs an export graph whose input embedding reads the token ids "
                                   "(fxpeft.trace(model, args, kwargs) with example inputs): a graph without shapes, "
                                   "or an embedding of something else, cannot be extended")
    layers = _attention_layers(gm)
    edges = _position_edges(gm, ids, layers)
    if not edges:
        raise UnsupportedSiteError("prefix tuning: no position computation (an arange over the sequence dim feeding "
                                   "position ids, rotary or position embeddings) was found, so the real tokens' "
                                   "positions cannot start after the prefix as in PEFT")
    return layers, edges


def _layer_prefix(emit: Emit, rows: fx.Node, i: int, which: int, la: _Layer, batch: fx.Node,
                  token_dim: int) -> fx.Node:
    """Layer ``i``'s keys (``which=0``) or values (``1``) of the prefix, as the attention node reads them."""
    kind = ("key", "value")[which]
    start = (2 * i + which) * token_dim  # PEFT's row layout: [num_layers, 2, heads, head_dim]
    name = f"layer{i}_prefix_{kind}"
    part = emit.op(aten.slice.Tensor, rows, 1, start, start + token_dim, label=f"{name}_rows")  # [NV, token_dim]
    part = emit.op(aten.reshape.default, part, [-1, la.kv_heads, la.head_dim], label=f"{name}_heads")  # [NV, H_kv, D]
    part = emit.op(aten.permute.default, part, [1, 0, 2], label=f"{name}_by_head")  # [H_kv, NV, D]
    if la.repeat > 1:  # as the graph's repeat_kv: query head h reads KV head h // n
        part = emit.op(aten.unsqueeze.default, part, 1, label=f"{name}_unsqueeze")  # [H_kv, 1, NV, D]
        part = emit.op(aten.expand.default, part, [-1, la.repeat, -1, -1], label=f"{name}_repeat")  # [H_kv, n, NV, D]
        part = emit.op(aten.reshape.default, part, [la.kv_heads * la.repeat, -1, la.head_dim],
                       label=f"{name}_repeated")  # [H, NV, D]
    return emit.op(aten.expand.default, part, [batch, -1, -1, -1], label=name)  # [B, heads, NV, D]


def _prepend(emit: Emit, x: fx.Node, prefix: fx.Node, nv: fx.Node, label: str) -> fx.Node:
    """``cat([prefix, x], dim=2)`` written so that ``x`` stays ``args[0]`` (the base value the OUT node stands in
    for): ``x`` padded by ``NV`` leading positions, the prefix written over them."""
    room = emit.op(aten.constant_pad_nd.default, x, [0, 0, nv, 0], replaces=0, label=f"{label}_room")  # [B, heads, NV+T, D]
    return emit.op(aten.slice_scatter.default, room, prefix, 2, 0, nv, role=Role.OUT, replaces=0, label=label)


def _extend_attention(emit: Emit, la: _Layer, i: int, rows: fx.Node, nv: fx.Node, token_dim: int,
                      padded_masks: dict[fx.Node, fx.Node]) -> None:
    """Layer ``i``'s prefix before the keys and values of its attention node, and the mask or query to match."""
    node = la.node
    before = set(emit.graph.nodes)
    a = _sdpa_arguments(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    batch = emit.op(aten.sym_size.int, k, 0, label=f"layer{i}_batch")
    new_k = _prepend(emit, k, _layer_prefix(emit, rows, i, 0, la, batch, token_dim), nv, f"layer{i}_key_with_prefix")
    new_v = _prepend(emit, v, _layer_prefix(emit, rows, i, 1, la, batch, token_dim), nv,
                     f"layer{i}_value_with_prefix")
    node.replace_input_with(k, new_k)
    node.replace_input_with(v, new_v)
    if isinstance(mask, fx.Node):  # NV leading "attend" columns: the prefix is visible to every query
        if mask not in padded_masks:
            attend = True if mask.meta["val"].dtype == torch.bool else 0.0  # an additive mask: 0
            padded_masks[mask] = emit.op(aten.constant_pad_nd.default, mask, [nv, 0], attend, role=Role.OUT,
                                         replaces=0, label="mask_with_prefix")
        node.replace_input_with(mask, padded_masks[mask])
    elif a["is_causal"]:
        # torch's is_causal is the top-left tril: with NV dummy query rows first (NV + T queries, NV + T keys),
        # real query t sees the prefix and real keys <= t, PEFT's mask; the dummy rows are sliced off after
        room = emit.op(aten.constant_pad_nd.default, q, [0, 0, nv, 0], role=Role.OUT, replaces=0,
                       label=f"layer{i}_query_after_dummies")  # [B, H, NV+T, D]
        node.replace_input_with(q, room)
        with emit.graph.inserting_after(node):
            out = emit.op(aten.slice.Tensor, node, 2, nv, None, role=Role.OUT, replaces=0,
                          label=f"layer{i}_attention_without_dummies")  # [B, H, T, D]
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
    new_nodes = [n for n in emit.graph.nodes if n not in before]
    stack = node.meta.get("nn_module_stack")
    if stack is not None:  # the nodes belong to the layer's attention, not to the embedding the adapter hangs off
        for n in new_nodes:
            n.meta["nn_module_stack"] = dict(stack)
