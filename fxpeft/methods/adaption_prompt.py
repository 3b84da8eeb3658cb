"""Adaption prompt (LLaMA-Adapter): zero-gated attention to learned prompts at the top attention layers,
interchangeable with HF PEFT's ``AdaptionPromptConfig`` (https://huggingface.co/papers/2303.16199). One file:
config, the attention-block finder, the graph edit, and PEFT's file format.

PEFT wraps the top ``adapter_layers`` attention modules of a Llama, Mistral or GPT-2 model. In the graph the same
edit is found structurally, with no per-architecture code: for each attention node
(``scaled_dot_product_attention``), its output projection is the linear site the attention output reaches
through views, and its key/value projections are the linear sites its key and value inputs come from (through
views, rotary embeddings, a ``split`` of a fused QKV projection, GQA's ``repeat_kv``). After the output
projection's call the adapter adds, per layer (``P`` the prompt ``[1, L, hidden]``, ``g`` the gate)::

    k = heads(k_proj(P)); v = heads(v_proj(P))       # [1, H, L, D]: no rotary embedding (the prompt has no position)
    a = softmax(q @ k^T / sqrt(D), fp32) * g @ v      # [B, H, T, D]: q the attention node's query (after RoPE)
    out = o_proj(x) + W_o · merge_heads(a)            # separate K/V projections (Llama, Mistral)
    out = c_proj(x) + merge_heads(a)                  # one fused QKV projection (GPT-2): PEFT adds it unprojected

``heads`` views the projection as ``[1, L, Hkv, D]`` and repeats each KV head for its query heads (GQA), as
PEFT's ``repeat_interleave``. The prompt attends without a mask (every real token sees every prompt token), as in
PEFT. ``g`` starts at 0: a new adapter gives exactly the base model. ``disable_adapters`` zeroes the gate in the
graph (``where(gate, g, 0)``), which also gives exactly the base.

Differences from PEFT, by choice: PEFT applies ``o_proj`` to the adapter's part with its bias, so a biased
``o_proj`` (``attention_bias=True``) gets its bias twice and a zero gate is not the base; fxpeft applies the
weight only (and warns). On GPT-2 PEFT adds the adapter's part after the attention's residual dropout, fxpeft
before it (the same in eval mode).

The prompt goes through the K/V projections' *base* weights (reads of their own, beside the calls): another
method's adapter at ``k_proj``/``v_proj`` (LoRA) changes the real tokens' keys but not the prompt's. Folding that
adapter into the weight would change the prompt's keys too, so ``merge_adapter`` (and ``MergeAdapters`` while the
prompt stays) refuse it with a typed error; ``fxpeft.merge`` removes the prompt first, as merge-and-unload removes
every adapter it does not merge. PEFT cannot combine adaption prompt with other methods at all; the output
projection refuses a second method's adapter as any site does.

**Supported graphs**: export graphs (``fxpeft.trace`` with example inputs; dynamic batch and sequence dims) whose
attention is ``aten.scaled_dot_product_attention`` with explicit or ``is_causal`` masks, grouped K/V expanded or
``enable_gqa``. Refused with a typed error, the graph unchanged: no attention node, an attention node whose output,
key or value projection was not found (the error names which), ``adapter_layers`` above the number of attention
layers, ``adapter_len``/``adapter_layers`` ≤ 0, and the generic target fields PEFT's config lacks. Merging is
refused (:class:`~fxpeft.MergeError`): the prompt attention depends on the input, there is no weight to fold into.

PEFT's file layout: per adapted layer ``base_model.model.<attention module>.adaption_prompt [1, L, hidden]`` and
``.adaption_gate [1]``; ``adapter_config.json`` has ``target_modules`` as the attention module's name
(``"self_attn"``, ``"attn"``), ``adapter_len`` and ``adapter_layers``.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import ConfigError, MergeError, TargetError, UnsupportedSiteError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Call, Site, find_sites, graph_dialect
from fxpeft.tags import Role, get_tag
from fxpeft.targeting import matches

__all__ = ["AdaptionPromptConfig", "AdaptionPromptAdapter", "AdaptionPrompt"]

aten = torch.ops.aten

_SDPA = aten.scaled_dot_product_attention.default
#: ops between an attention node's output and its output projection's input
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
          aten.permute.default, aten.contiguous.default, aten.clone.default, aten.flatten.using_ints}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
#: how far the finder walks back from an attention input before giving up (a projection is a few ops away)
_MAX_WALK = 2000


@dataclass
class AdaptionPromptConfig(PeftConfigBase):
    """Adaption-prompt settings, with HF PEFT's field names (``peft.AdaptionPromptConfig``).

    Args:
        adapter_len: prompt tokens per adapted layer (required, > 0).
        adapter_layers: how many attention layers, counted from the top, get a prompt (required, > 0).
        target_modules: the attention modules' name (PEFT: ``"self_attn"`` for Llama/Mistral, ``"attn"`` for GPT-2,
            matched as a name suffix); None: every attention node of the graph is a candidate.

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.zoo import tiny_llama
        >>> model, args, kwargs = tiny_llama(layers=1, seq=4)
        >>> gm = fxpeft.rewrite(fxpeft.trace(model, args, kwargs),
        ...                     fxpeft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
        >>> ids = kwargs["input_ids"]
        >>> bool((gm(input_ids=ids).logits == model(input_ids=ids).logits).all())  # the gate starts at 0
        True
    """

    adapter_len: int | None = None
    adapter_layers: int | None = None


class AdaptionPromptAdapter(AdapterModule):
    """One attention layer's prompt, held at its output projection's site.

    Attributes:
        adaption_prompt: the prompt tokens ``[1, adapter_len, hidden]`` (N(0, 1), as PEFT).
        adaption_gate: the learned gate ``[1]`` (0 at init: the base model).
        adapter_len: the prompt length.
        attention_path: the attention module it adapts (PEFT's wrapped module), set by the graph edit.
    """

    method = "adaption_prompt"

    def __init__(self, site: Site, adapter_name: str, adapter_len: int, weight: torch.Tensor) -> None:
        super().__init__(site.name, adapter_name)
        self.adapter_len = adapter_len
        self.attention_path = ""  # the attention module it adapts, set when the graph edit goes in
        kw = {"dtype": weight.dtype, "device": weight.device}  # PEFT keeps the prompt in the base dtype
        self.adaption_prompt = nn.Parameter(torch.empty(1, adapter_len, site.out_features, **kw).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, **kw))


# ------------------------------------------------------------------------------------------- the finder

@dataclass(frozen=True)
class _Projection:
    """A key or value projection: its site and call, and the columns of its output the attention reads (a
    fused QKV projection's chunk; None: all of them)."""

    site: Site
    call: Call
    chunk: tuple[int, int] | None


@dataclass(frozen=True)
class _Block:
    """One attention node and the projections around it."""

    sdpa: fx.Node
    path: str            # the attention module (PEFT's wrapped module): where files keep its tensors
    out: Site            # the output projection: the adapter's site
    key: _Projection
    value: _Projection


def _module_path(node: fx.Node) -> str:
    """The innermost module whose forward computed ``node`` ('' when the graph records none)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The model's attention nodes, in execution order (fxpeft's own nodes excluded)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _SDPA and get_tag(n) is None]


def _output_site(sdpa: fx.Node, by_call: dict[fx.Node, tuple[Site, Call]]) -> Site | None:
    """The linear site whose input is the attention output after a few views (merge heads)."""
    found, todo, seen = [], [sdpa], {sdpa}
    while todo:
        node = todo.pop()
        for user in node.users:
            hit = by_call.get(user)
            if hit is not None and hit[1].input is node:
                found.append(hit[0])
            elif user not in seen and user.op == "call_function" and user.target in _VIEWS and get_tag(user) is None:
                seen.add(user)
                todo.append(user)
    return found[0] if len(found) == 1 else None


def _source_calls(start: fx.Node, by_call: dict[fx.Node, tuple[Site, Call]]) -> list[tuple[Site, Call]]:
    """The linear calls an attention input is computed from, walking back and stopping at each call found.

    An adapter's nodes are crossed through the base value they stand in for only (LoRA on ``k_proj``), so that
    the walk does not follow the adapter's own reads of the layer input back into earlier layers.
    """
    found, todo, seen = [], [start], {start}
    while todo and len(seen) < _MAX_WALK:
        node = todo.pop()
        if node in by_call:
            found.append(by_call[node])
            continue
        tag = get_tag(node)
        if tag is not None:
            nxt = [node.args[tag.replaces]] if tag.replaces is not None else []
        else:
            nxt = node.all_input_nodes if node.op == "call_function" else []
        for a in nxt:
            if isinstance(a, fx.Node) and a not in seen:
                seen.add(a)
                todo.append(a)
    return list({id(c.node): (s, c) for s, c in found}.values())


def _chunk(start: fx.Node, call: Call) -> tuple[int, int] | None:
    """The columns of ``call``'s output that reach ``start`` through a ``split`` (a fused projection); None if the
    first-argument chain from ``start`` back to the call passes no split."""
    node = start
    for _ in range(64):
        if node is call.node or not isinstance(node, fx.Node) or not node.args:
            return None
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0].target in _SPLITS:
            split, i = node.args[0], node.args[1]
            src, sizes, dim = split.args[0], split.args[1], split.args[2] if len(split.args) > 2 else 0
            width = src.meta["val"].shape[-1]
            if dim not in (-1, src.meta["val"].dim() - 1):
                return None
            bounds = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes] * math.ceil(width / sizes)
            begin = sum(bounds[:i])
            return begin, min(begin + bounds[i], width)
        node = node.args[0]
    return None


def _projection(block: str, which: str, start: fx.Node, by_call) -> _Projection:
    calls = _source_calls(start, by_call)
    if len(calls) != 1:
        what = "none" if not calls else f"{len(calls)} ({[s.name for s, _ in calls][:4]})"
        raise UnsupportedSiteError(f"adaption prompt: the {which} projection feeding the attention node of {block!r} "
                                   f"was not found (linear sites reached: {what}); it needs one linear projection "
                                   f"for the attention's {which}s")
    site, call = calls[0]
    return _Projection(site, call, _chunk(start, call))


def _attention_blocks(gm: fx.GraphModule, sites: dict[str, Site]) -> list[_Block]:
    """Every attention node with its output, key and value projections, in execution order.

    Raises:
        UnsupportedSiteError: no attention node, or one whose projections were not found (the message says which).
    """
    if graph_dialect(gm) != "export":
        raise UnsupportedSiteError("adaption prompt needs an export graph (fxpeft.trace with example inputs): its "
                                   "attention nodes are found as aten.scaled_dot_product_attention")
    nodes = _attention_nodes(gm)
    if not nodes:
        raise UnsupportedSiteError("adaption prompt: no attention node (aten.scaled_dot_product_attention) was found "
                                   "in the graph; trace a transformers model with its sdpa attention "
                                   "(attn_implementation='sdpa', transformers' default)")
    by_call = _linear_calls(sites)
    return [_block(sdpa, by_call) for sdpa in nodes]


def _linear_calls(sites: dict[str, Site]) -> dict[fx.Node, tuple[Site, Call]]:
    return {c.node: (s, c) for s in sites.values() if s.kind == "linear" for c in s.calls}


def _block(sdpa: fx.Node, by_call: dict[fx.Node, tuple[Site, Call]]) -> _Block:
    """One attention node's block; a typed error naming the projection that was not found."""
    path = _module_path(sdpa) or sdpa.name
    out = _output_site(sdpa, by_call)
    if out is None:
        raise UnsupportedSiteError(f"adaption prompt: the output projection of the attention node of {path!r} was "
                                   "not found (no single linear site reads the attention output through views)")
    k, v = sdpa.args[1:3]
    return _Block(sdpa, path, out, _projection(path, "key", k, by_call), _projection(path, "value", v, by_call))


def _targeted(block: _Block, spec: list[str] | str | None) -> bool:
    """PEFT's rule (the attention module's name ends with ``.<target_modules>``), or the output projection's
    site named by the spec (fxpeft's exact selection when it reloads a file)."""
    if spec is None:
        return True
    names = [spec] if isinstance(spec, str) else list(spec)
    return any(block.path == t or block.path.endswith(f".{t}") for t in names) or matches(spec, block.out.name)


def _block_of(gm: fx.GraphModule, call: Call) -> _Block:
    """The block whose output projection is ``call``: found back from its input through views (one walk, not
    every block's, so a rewrite of N layers stays linear in the attention walks)."""
    node = call.input
    while node.target in _VIEWS:  # select_sites found this path forward from the attention node
        node = node.args[0]
    return _block(node, _linear_calls(find_sites(gm)))


# ------------------------------------------------------------------------------------------- the graph edit

def _heads(emit: Emit, proj: _Projection, prompt: fx.Node, length: int, head_dim: int, heads: int,
           label: str) -> fx.Node:
    """The prompt through a key or value projection, as ``[1, heads, L, head_dim]`` (KV heads repeated for GQA)."""
    pe = Emit(emit.gm, emit.tag, proj.call, proj.site, emit.export)  # reads that projection's weight and bias
    # a read of its own (tagged), so merge passes do not take it for a second call site of the weight (a tie)
    w = pe.weight(own=True)
    if proj.site.fan_in_fan_out:  # HF Conv1D keeps [in, out]
        w = emit.op(aten.t.default, w, label=f"{label}_weight_t")
    x = emit.op(aten.linear.default, prompt, w, pe.bias(), label=f"prompt_{label}")  # [1, L, out]
    if proj.chunk is not None:  # one chunk of a fused QKV projection
        x = emit.op(aten.slice.Tensor, x, -1, proj.chunk[0], proj.chunk[1], label=f"prompt_{label}_chunk")
    width = proj.chunk[1] - proj.chunk[0] if proj.chunk else proj.site.out_features
    kv = width // head_dim
    x = emit.op(aten.view.default, x, [1, length, kv, head_dim], label=f"prompt_{label}_heads")  # [1, L, Hkv, D]
    x = emit.op(aten.transpose.int, x, 1, 2, label=f"prompt_{label}_t")  # [1, Hkv, L, D]
    if kv != heads:  # each KV head serves heads // kv query heads, adjacent (repeat_interleave on dim 1)
        x = emit.op(aten.unsqueeze.default, x, 2, label=f"prompt_{label}_u")  # [1, Hkv, 1, L, D]
        x = emit.op(aten.expand.default, x, [1, kv, heads // kv, length, head_dim], label=f"prompt_{label}_rep")
        x = emit.op(aten.reshape.default, x, [1, heads, length, head_dim], label=f"prompt_{label}_gqa")
    return x


def _check_heads(block: _Block) -> tuple[int, int, int]:
    """``(query heads, key head dim, value head dim)``; a typed error where the projections do not split into them."""
    q, k, v = (a.meta.get("val") for a in block.sdpa.args[:3])
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)) or not isinstance(q.shape[1], int):
        raise UnsupportedSiteError(f"adaption prompt: the attention node of {block.path!r} does not take "
                                   "[batch, heads, seq, head_dim] query/key/value with a fixed head count")
    heads, dk, dv = q.shape[1], k.shape[-1], v.shape[-1]
    for proj, d, which in ((block.key, dk, "key"), (block.value, dv, "value")):
        width = proj.chunk[1] - proj.chunk[0] if proj.chunk else proj.site.out_features
        if not isinstance(d, int) or width % d or heads % (width // d):
            raise UnsupportedSiteError(f"adaption prompt: the {which} projection {proj.site.name!r} of {block.path!r} "
                                       f"gives {width} features, not whole heads of {d} for {heads} query heads")
        if proj.site.in_features != block.out.out_features:
            raise UnsupportedSiteError(f"adaption prompt: the {which} projection {proj.site.name!r} reads "
                                       f"{proj.site.in_features} features, not the hidden size "
                                       f"{block.out.out_features} the prompt has")
    return heads, dk, dv


@PeftRegistry.register("adaption_prompt")
class AdaptionPrompt(Method):
    """PEFT's ``ADAPTION_PROMPT``: gated attention of each real token to learned prompt tokens, at the top layers."""

    config_cls = AdaptionPromptConfig
    adapter_cls = AdaptionPromptAdapter
    display_name = "Adaption prompt"
    color = ("#fff3bf", "#e67700")
    site_kinds = frozenset({"linear"})
    spec_aliases = {"len": "adapter_len", "layers": "adapter_layers"}
    # PEFT's config has target_modules but none of these generic fields
    peft_absent_fields = frozenset({"exclude_modules", "modules_to_save"})

    @classmethod
    def validate_config(cls, config: AdaptionPromptConfig) -> None:
        for name in ("adapter_len", "adapter_layers"):
            v = getattr(config, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}; set e.g. {name}=10"
                                  if name == "adapter_len" else f"{name} must be a positive integer, got {v!r}; "
                                  "set the number of top attention layers to adapt, e.g. adapter_layers=2")
        for name in ("exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"):
            if getattr(config, name):
                raise ConfigError(f"adaption prompt does not take {name} (PEFT's config has no such field): "
                                  "it adapts the top adapter_layers attention layers; unset it")
        tm = config.target_modules
        if tm is not None and not (isinstance(tm, str) or isinstance(tm, (list, tuple))
                                   and all(isinstance(t, str) for t in tm)):
            raise ConfigError(f"target_modules must be the attention modules' name (e.g. 'self_attn') or None, "
                              f"got {tm!r}")

    @classmethod
    def select_sites(cls, gm: fx.GraphModule, config: AdaptionPromptConfig, sites: dict[str, Site],
                     select) -> list[Site]:
        every = _attention_blocks(gm, sites)
        blocks = [b for b in every if _targeted(b, config.target_modules)]
        if not blocks:
            names = sorted({b.path.rsplit(".", 1)[-1] for b in every})
            raise TargetError(f"adaption prompt: target_modules={config.target_modules!r} names no attention module "
                              f"of the graph (their names: {names}); leave it unset or name the attention modules")
        if config.adapter_layers > len(blocks):
            raise TargetError(f"adapter_layers={config.adapter_layers} exceeds the {len(blocks)} attention layer(s) "
                              f"of the graph; set adapter_layers to at most {len(blocks)}")
        chosen = blocks[-config.adapter_layers:]  # the top layers: the last attention nodes executed
        for b in chosen:
            if len(b.out.calls) != 1:
                raise UnsupportedSiteError(f"adaption prompt: the output projection {b.out.name!r} is called "
                                           f"{len(b.out.calls)} times; it needs one call per attention layer")
            _check_heads(b)
        biased = [b.out.name for b in chosen if b.key.call.node is not b.value.call.node and b.out.bias is not None]
        if biased:
            warnings.warn(f"adaption prompt: the output projections {biased[:3]} have a bias; PEFT's adaption prompt "
                          "applies them to the prompt's part with the bias (adding it a second time), fxpeft with the "
                          "weight only (a zero gate gives the base model), so a file gives other outputs in PEFT")
        return [b.out for b in chosen]

    @classmethod
    def build(cls, site: Site, config: AdaptionPromptConfig, adapter_name: str,
              weight: torch.Tensor) -> AdaptionPromptAdapter:
        return AdaptionPromptAdapter(site, adapter_name, config.adapter_len, weight)

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: AdaptionPromptAdapter) -> None:
        block = _block_of(emit.gm, emit.call)
        heads, dk, dv = _check_heads(block)
        query = block.sdpa.args[0]  # [B, H, T, D], after the rotary embedding: PEFT recomputes the same
        prompt = emit.param("adaption_prompt", label="adaption_prompt")  # [1, L, hidden]
        adapter.attention_path = block.path  # PEFT's wrapped module: names the file's target_modules
        learned = emit.param("adaption_gate", label="adaption_gate")
        gate = emit.op(aten.where.ScalarOther, emit.param("gate", Role.GATE), learned, 0.0,
                       label="adaption_gate_live")  # [1]: 0 while the adapter is off, so the graph is the base
        keys = _heads(emit, block.key, prompt, adapter.adapter_len, dk, heads, "keys")  # [1, H, L, D]
        values = _heads(emit, block.value, prompt, adapter.adapter_len, dv, heads, "values")  # [1, H, L, Dv]
        kt = emit.op(aten.transpose.int, keys, 2, 3, label="prompt_keys_T")  # [1, H, D, L]
        scores = emit.op(aten.matmul.default, query, kt, label="prompt_scores")  # [B, H, T, L]
        scores = emit.op(aten.div.Tensor, scores, math.sqrt(dk), label="prompt_scores_scaled")
        probs = emit.op(aten.softmax.int, scores, -1, torch.float32, label="prompt_probs")  # PEFT's fp32 softmax
        dtype = query.meta["val"].dtype
        if dtype != torch.float32:
            probs = emit.cast(probs, dtype)
        probs = emit.op(aten.mul.Tensor, probs, gate, label="prompt_probs_gated")
        att = emit.op(aten.matmul.default, probs, values, label="prompt_attention")  # [B, H, T, Dv]
        att = emit.op(aten.transpose.int, att, 1, 2, label="prompt_attention_t")  # [B, T, H, Dv]
        delta = emit.op(aten.flatten.using_ints, att, 2, label="prompt_attention_merged")  # [B, T, H*Dv]
        if block.key.call.node is not block.value.call.node:  # separate K/V projections: PEFT applies o_proj
            w = emit.weight(own=True)
            if site.fan_in_fan_out:
                w = emit.op(aten.t.default, w, label="out_weight_t")
            delta = emit.op(aten.linear.default, delta, w, label="prompt_out")  # the weight only: see the docstring
        if emit.call.node.meta["val"].dim() == 2:  # an addmm on flattened tokens ([B*T, out], GPT-2's Conv1D)
            delta = emit.op(aten.flatten.using_ints, delta, 0, 1, label="prompt_out_rows")
        out = emit.op(aten.add.Tensor, emit.call.node, delta, role=Role.OUT, replaces=0, label="with_prompt")
        emit.replace_output(out)

    @classmethod
    def fold(cls, adapter: AdaptionPromptAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        raise MergeError(f"adaption prompt adapter {adapter.adapter_name!r} cannot be merged: its prompt attention "
                         "depends on each input's queries, so there is no weight change to fold. Keep it unmerged, "
                         "or remove it (fxpeft.remove_adapters) for the base model")

    @classmethod
    def unfold(cls, adapter: AdaptionPromptAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        raise MergeError("adaption prompt adapters are never merged; there is nothing to unmerge")

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def file_names(cls, gm: fx.GraphModule, sites: list[Site]) -> dict[str, str]:
        paths = {b.out.name: b.path for b in _attention_blocks(gm, find_sites(gm))}
        return {s.name: paths[s.name] for s in sites}

    @classmethod
    def site_shapes(cls, config: AdaptionPromptConfig, site: Site) -> dict[str, tuple[int, ...]]:
        return {"adaption_prompt": (1, config.adapter_len, site.out_features), "adaption_gate": (1,)}

    @classmethod
    def site_tensors(cls, adapter: AdaptionPromptAdapter, site: Site) -> dict[str, torch.Tensor]:
        return {"adaption_prompt": adapter.adaption_prompt.detach(), "adaption_gate": adapter.adaption_gate.detach()}

    @classmethod
    def load_site_tensors(cls, adapter: AdaptionPromptAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            adapter.adaption_prompt.copy_(tensors["adaption_prompt"])
            adapter.adaption_gate.copy_(tensors["adaption_gate"])

    @classmethod
    def site_settings(cls, config: AdaptionPromptConfig, site: Site) -> dict[str, Any]:
        return {"adapter_len": config.adapter_len}

    @classmethod
    def adapter_settings(cls, adapter: AdaptionPromptAdapter) -> dict[str, Any]:
        return {"adapter_len": adapter.adapter_len}

    @classmethod
    def config_fields(cls, adapters: dict[str, AdaptionPromptAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        lengths = {m.adapter_len for m in adapters.values()}
        if len(lengths) != 1:
            raise ConfigError(f"adaption prompt adapters of one name must share adapter_len, got {sorted(lengths)}")
        names = sorted({m.attention_path.rsplit(".", 1)[-1] for m in adapters.values()})
        # PEFT matches target_modules as the attention modules' name suffix: one name when they share it
        return {"adapter_len": lengths.pop(), "adapter_layers": len(adapters),
                "target_modules": names[0] if len(names) == 1 else names}
