"""Prompt tuning: learned virtual-token embeddings prepended to the input, interchangeable with HF PEFT's
``PromptTuningConfig`` (https://huggingface.co/papers/2104.08691). One file: config, the graph edit, and PEFT's
file format.

PEFT runs the model on ``inputs_embeds = cat(prompt, embed(input_ids))`` and prepends ones to the attention mask
(and ``-100`` to the labels). In the graph the same thing is one structural edit at the input embedding, found
without any per-architecture code:

* the sequence inputs are lengthened by ``NV`` positions at the graph's entry (``constant_pad_nd`` on the left):
  ``input_ids`` (filler id 0, whose embedding row is then overwritten), ``attention_mask`` (ones) and ``labels``
  (``-100``). Everything the model derives from the sequence length (``sym_size``, positions, ``cache_position``,
  the causal mask) is computed from these inputs, so it sees ``NV + T`` as in PEFT's forward;
* the embedding's output ``[B, NV+T, H]`` gets the prompt rows written over its first ``NV`` positions
  (``slice_scatter``): the gradient reaches only the prompt.

**Output layout.** As PEFT's prompt tuning returns it: logits ``[B, NV+T, V]``, the first ``NV`` positions those of
the virtual tokens; the loss (with a ``labels`` input) predicts the first real token from the last virtual one.
With the adapter off (``disable_adapters``, ``set_adapter`` to another adapter) the prompt has no rows: the graph
computes exactly the base model, ``[B, T, V]``. The choice is a Python flag on the adapter
(:class:`PromptSwitch`): ``torch.compile`` guards on it (no graph break) and :func:`fxpeft.export` writes a
``.pt2`` with the prompt in (dynamic batch and sequence dims kept). Greedy generation re-runs the graph on the
growing sequence and reads the next token at the last position, ``logits[:, -1]``: the prompt goes in again at
every step, as PEFT's forward puts it.

**Supported graphs**: export graphs with a dynamic sequence dim (``fxpeft.trace``'s default) whose sequence inputs
are ``input_ids`` and optionally ``attention_mask`` / ``labels`` (decoders such as Llama and GPT-2, encoders such as
BERT, whose position and token-type ids are sliced to the longer length as in PEFT), and symbolic_trace graphs
(functional LMs). A per-row ``labels [B]`` (sequence classification, ``task_type="SEQ_CLS"``, whose ``classifier``
trains as a ``modules_to_save`` copy) is not lengthened, as in PEFT.
Refused with a typed error, the graph unchanged: no embedding reading a graph input, a sequence length fixed at
trace time, another sequence-length input (``position_ids``, ``token_type_ids``), a second prompt adapter.
Merging is refused (:class:`~fxpeft.MergeError`): virtual tokens are not a weight change.

PEFT's file layout: one tensor ``prompt_embeddings [NV * num_transformer_submodules, token_dim]`` (no
``base_model.model.`` prefix), ``modules_to_save`` copies under ``base_model.<module>.`` (PEFT's prompt models wrap
no tuner); ``adapter_config.json`` has no ``target_modules``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import ConfigError, MergeError, UnsupportedSiteError
from fxpeft.registry import (
    AdapterModule,
    Emit,
    Method,
    PeftConfigBase,
    PeftRegistry,
    config_from_fields,
)
from fxpeft.sites import Site
from fxpeft.tags import Role

from .lora import adapter_dtype
from .trainable_tokens import _input_embedding

__all__ = ["PromptTuningConfig", "PromptTuningAdapter", "PromptTable", "PromptSwitch", "PromptState", "PromptTuning"]

aten = torch.ops.aten

_KEY = "prompt_embeddings"
_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
#: the sequence inputs PEFT lengthens, and the value of their virtual positions (HF's keyword names)
_PADS = {"attention_mask": 1, "labels": -100}


@dataclass
class PromptTuningConfig(PeftConfigBase):
    """Prompt-tuning settings, with HF PEFT's field names and defaults (``peft.PromptTuningConfig``).

    Args:
        num_virtual_tokens: how many learned embeddings go before the input (required, > 0).
        prompt_tuning_init: ``"RANDOM"`` (normal rows, as ``nn.Embedding``), ``"SAMPLE_VOCAB"`` (rows of the input
            embedding at random token ids) or ``"TEXT"`` (rows of the input embedding at the tokenizer's ids of
            the init text, cut or repeated to ``num_virtual_tokens`` as PEFT does; fxpeft loads no tokenizer, so
            a new TEXT adapter needs ``prompt_tuning_init_token_ids``. A saved TEXT-initialised PEFT adapter loads
            without it, its prompt being the file's).
        prompt_tuning_init_token_ids: fxpeft's own field, the tokenizer's output for TEXT init:
            ``tokenizer(prompt_tuning_init_text)["input_ids"]``.
        prompt_tuning_init_text, tokenizer_name_or_path, tokenizer_kwargs: PEFT's TEXT init settings, written back
            to files (a file says ``"TEXT"`` only with both the text and the tokenizer, as PEFT requires; else
            ``"RANDOM"``: the file's rows are the prompt either way).
        token_dim: the embedding width; None: read off the input embedding (must match it when set).
        num_transformer_submodules: 1 (decoder-only and encoder models); 2 (encoder-decoder) is refused.
        num_attention_heads, num_layers: PEFT bookkeeping (not used by prompt tuning).
        target_modules: the input embedding; None (PEFT's files): the model's ``get_input_embeddings`` for HF
            models, else the one embedding that reads a graph input.

    Example:
        >>> import fxpeft
        >>> from fxpeft.zoo import functional_lm
        >>> model, args, _ = functional_lm()
        >>> gm = fxpeft.rewrite(fxpeft.trace(model), fxpeft.PromptTuningConfig(num_virtual_tokens=3))
        >>> tuple(gm(*args).shape), tuple(model(*args).shape)
        ((2, 15, 64), (2, 12, 64))
    """

    num_virtual_tokens: int | None = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    prompt_tuning_init_token_ids: list[int] | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None


class PromptTable(nn.Module):
    """The adapter's prompt, shared state of its one site: ``prompt_embeddings [NV, dim]`` (trainable).

    Attributes:
        sample_vocab: the rows are still to be drawn from the input embedding (``SAMPLE_VOCAB``, ``TEXT``), when
            the graph is at hand.
        init_ids: the token ids whose embedding rows the prompt starts from (``TEXT``: ``NV`` of them, PEFT's
            cut or repetition of the text's ids); None: random ids (``SAMPLE_VOCAB``).
    """

    def __init__(self, num_virtual_tokens: int, dim: int, dtype: torch.dtype, device: torch.device,
                 sample_vocab: bool, init_ids: list[int] | None = None) -> None:
        super().__init__()
        # PEFT's prompt encoder is an nn.Embedding: its default init draws N(0, 1) rows
        self.prompt_embeddings = nn.Parameter(torch.randn(num_virtual_tokens, dim, dtype=dtype, device=device))
        self.sample_vocab = sample_vocab
        self.init_ids = init_ids


class PromptTuningAdapter(AdapterModule):
    """Marks the input embedding where the prompt goes in; holds the on/off gate (the prompt is :class:`PromptTable`).

    Attributes:
        num_virtual_tokens / token_dim: the prompt's shape.
        init: the ``prompt_tuning_init`` it was built with, and ``text_init`` PEFT's TEXT settings (written back
            to files).
    """

    method = "prompt_tuning"

    def __init__(self, site: Site, adapter_name: str, config: PromptTuningConfig) -> None:
        super().__init__(site.name, adapter_name)
        self.num_virtual_tokens = config.num_virtual_tokens
        self.token_dim = site.weight_shape[1]
        self.init = config.prompt_tuning_init
        self.text_init = {"prompt_tuning_init_text": config.prompt_tuning_init_text,
                          "tokenizer_name_or_path": config.tokenizer_name_or_path,
                          "tokenizer_kwargs": config.tokenizer_kwargs}
        self.switch = PromptSwitch()

    def gate_changed(self, on: bool) -> None:
        self.switch.on = on  # the graph's choice of rows follows the gate


class PromptSwitch(nn.Module):
    """The prompt rows while the adapter is on, none while it is off (the graph then computes the base model).

    The number of rows is the sequence's extra length, so no tensor op can switch it: the choice is made on a
    Python flag kept in step with the adapter's gate (:meth:`AdapterModule.gate_changed`), read where the graph
    calls this module. ``torch.compile`` guards on the flag (a toggle recompiles once, no graph break) and
    ``torch.export`` records the state it sees: a ``.pt2`` of an enabled adapter carries the prompt.

    Attributes:
        on: the adapter is enabled and not merged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.on = True

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return table if self.on else table[:0]  # [NV, dim] or [0, dim]


def live_rows(table: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The prompt rows while the adapter is on, none while it is off: the graph then computes the base model.

    A Python choice on the gate (the number of rows is the sequence's extra length: no tensor op can switch it).
    """
    return table if bool(gate) else table[:0]  # [NV, dim] or [0, dim]


def _graph_input(node: fx.Node) -> fx.Node | None:
    """The placeholder the embedding's indices come from, through a few views (GPT-2 flattens ``input_ids``)."""
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            return node
        if node.op not in ("call_function", "call_method") or not node.args:
            return None
        node = node.args[0]
    return None


def _is_check(node: fx.Node) -> bool:
    """A call nobody reads (export's input guards, metadata asserts): it keeps checking the caller's inputs."""
    return not node.users and node.op != "output"


def _sequence_inputs(gm: fx.GraphModule, site: Site) -> tuple[fx.Node, dict[fx.Node, int]]:
    """The indices' placeholder and the other inputs to lengthen with their pad values; a typed error for a graph
    whose sequence length cannot be lengthened (nothing changed)."""
    if len(site.calls) != 1:
        raise UnsupportedSiteError(f"prompt tuning: the input embedding {site.name!r} is called {len(site.calls)} "
                                   "times in the graph; it needs exactly one embedding of the input ids")
    ids = _graph_input(site.calls[0].input)
    if ids is None:
        raise UnsupportedSiteError(f"prompt tuning: the embedding {site.name!r} does not read a graph input (the "
                                   "token ids): no embedding node of the input was found")
    val = ids.meta.get("val")
    seq = val.shape[-1] if isinstance(val, torch.Tensor) and val.dim() >= 1 else None
    if val is not None and not isinstance(seq, torch.SymInt):
        raise UnsupportedSiteError(f"prompt tuning: the sequence length of {ids.target!r} was fixed at trace time "
                                   f"({seq}), so the graph cannot take NV more positions; trace with a dynamic "
                                   "sequence dim (fxpeft.trace's default, with a sequence longer than 1)")
    pads = {}
    for p in gm.graph.nodes:
        if p.op != "placeholder" or p is ids or not p.users:
            continue
        pval = p.meta.get("val")
        if p.target == "labels" and isinstance(pval, torch.Tensor) and pval.dim() < 2:
            continue  # one label per row (sequence classification): PEFT passes it as it is
        if p.target in _PADS:
            pads[p] = _PADS[p.target]
            continue
        if isinstance(pval, torch.Tensor) and seq is not None and any(
                isinstance(d, torch.SymInt) and str(d) == str(seq) for d in pval.shape):
            raise UnsupportedSiteError(f"prompt tuning: the graph input {p.target!r} has the sequence length; fxpeft "
                                       "lengthens only input_ids, attention_mask and labels (PEFT drops "
                                       "position_ids and token_type_ids): trace without it")
    return ids, pads


class PromptState:
    """The parts of the method interface every prompt method shares: the learned state is the graph's shared state
    (PEFT's ``prompt_embeddings``), the per-site adapter holds no tensor, and nothing is ever merged."""

    @classmethod
    def unfold(cls, adapter: AdapterModule, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        raise MergeError(f"{cls.display_name} adapters are never merged; there is nothing to unmerge")

    @staticmethod
    def refuse_second(emit: Emit, adapter: AdapterModule, kind: type[AdapterModule], what: str) -> None:
        """One ``what`` (prompt, prefix) per graph: a second adapter of ``kind`` would lengthen the sequence again."""
        others = [m for m in emit.gm.modules() if isinstance(m, kind) and m is not adapter]
        if others:  # (the inject transaction puts the graph back)
            raise UnsupportedSiteError(f"the graph already holds the {what}-tuning adapter {others[0].adapter_name!r}; "
                                       f"fxpeft runs one {what} per graph (remove it first, or trace another copy)")

    @classmethod
    def input_embedding_site(cls, gm: fx.GraphModule, config: PeftConfigBase, sites: dict[str, Site],
                             select) -> list[Site]:
        """The one input embedding the method goes in at: HF's, or the single embedding reading a graph input,
        unless ``target_modules`` names one."""
        what = cls.display_name.lower()
        if config.target_modules is None:
            name = _input_embedding(gm, sites)
            if name not in sites:
                raise UnsupportedSiteError(f"{what}: no embedding node of the input was found (no HF input embedding, "
                                           "and no single embedding reading a graph input); pass "
                                           "target_modules=[<the token embedding>]")
            chosen = [sites[name]]
        else:
            chosen = select(config)
        if len(chosen) != 1:
            raise UnsupportedSiteError(f"{what} goes in at one input embedding; target_modules selects "
                                       f"{[s.name for s in chosen][:4]}")
        return chosen

    @classmethod
    def site_shapes(cls, config: PeftConfigBase, site: Site) -> dict[str, tuple[int, ...]]:
        return {}

    @classmethod
    def site_tensors(cls, adapter: AdapterModule, site: Site) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def load_site_tensors(cls, adapter: AdapterModule, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        pass  # the prompt is the shared state's


@PeftRegistry.register("prompt_tuning")
class PromptTuning(PromptState, Method):
    """PEFT's ``PROMPT_TUNING``: learned rows before the token embeddings, the sequence inputs lengthened to match."""

    config_cls = PromptTuningConfig
    display_name = "Prompt tuning"
    color = ("#e5dbff", "#5f3dc4")
    site_kinds = frozenset({"embedding"})
    spec_aliases = {"nv": "num_virtual_tokens", "init": "prompt_tuning_init"}
    targets_from_graph = True
    peft_absent_fields = frozenset({"target_modules", "exclude_modules"})  # PEFT's prompt configs have neither
    copies_prefix = "base_model."  # PEFT's prompt models hold the HF model as base_model directly

    @classmethod
    def validate_config(cls, config: PromptTuningConfig) -> None:
        nv = config.num_virtual_tokens
        if not (isinstance(nv, int) and not isinstance(nv, bool) and nv > 0):
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {nv!r}; set e.g. "
                              "num_virtual_tokens=20")
        init = str(getattr(config.prompt_tuning_init, "value", config.prompt_tuning_init)).upper()
        if init not in _INITS:
            raise ConfigError(f"prompt_tuning_init={config.prompt_tuning_init!r} is not one of {list(_INITS)}")
        ids = config.prompt_tuning_init_token_ids
        if init == "TEXT" and ids is None:
            raise ConfigError("prompt_tuning_init='TEXT' needs the tokenizer's output, and fxpeft loads no tokenizer: "
                              "pass prompt_tuning_init_token_ids=tokenizer(prompt_tuning_init_text)['input_ids'], use "
                              "'SAMPLE_VOCAB' or 'RANDOM', or init with PEFT and load its file (fxpeft.load_adapter)")
        if ids is not None:
            if init != "TEXT":
                raise ConfigError(f"prompt_tuning_init_token_ids is the TEXT init's input; with "
                                  f"prompt_tuning_init={init!r} it would be ignored: set prompt_tuning_init='TEXT'")
            if not (isinstance(ids, (list, tuple)) and ids and all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
                raise ConfigError(f"prompt_tuning_init_token_ids must be a non-empty list of token ids (ints >= 0), "
                                  f"got {ids!r}")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            v = getattr(config, name)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ConfigError(f"{name} must be a positive integer or None, got {v!r}")
        if config.num_transformer_submodules not in (None, 1):
            raise ConfigError(f"num_transformer_submodules={config.num_transformer_submodules!r}: fxpeft's prompt "
                              "tuning supports one transformer stack (1, decoder-only or encoder models), not "
                              "encoder-decoder prompts")

    @classmethod
    def config_from_peft(cls, fields: dict[str, Any]) -> PromptTuningConfig:
        init = str(getattr(fields.get("prompt_tuning_init"), "value", fields.get("prompt_tuning_init"))).upper()
        if init == "TEXT" and fields.get("inference_mode") is True:
            # a saved adapter (PEFT writes inference_mode=True): the file's prompt replaces any init, so a
            # TEXT-initialised adapter loads without a tokenizer
            fields = {**fields, "prompt_tuning_init": "RANDOM"}
        return config_from_fields(cls, fields)

    @classmethod
    def fill_defaults(cls, config: PromptTuningConfig, model_type: str | None) -> PromptTuningConfig:
        config = copy.copy(config)
        config.prompt_tuning_init = str(getattr(config.prompt_tuning_init, "value", config.prompt_tuning_init)).upper()
        return config

    @classmethod
    def select_sites(cls, gm: fx.GraphModule, config: PromptTuningConfig, sites: dict[str, Site],
                     select) -> list[Site]:
        chosen = cls.input_embedding_site(gm, config, sites, select)
        _sequence_inputs(gm, chosen[0])  # refuses a graph whose sequence length cannot grow, before any change
        return chosen

    @classmethod
    def check_selection(cls, config: PromptTuningConfig, sites: list[Site]) -> None:
        vocab, dim = sites[0].weight_shape[:2]
        if config.token_dim is not None and config.token_dim != dim:
            raise ConfigError(f"token_dim={config.token_dim} does not match the input embedding's width {dim} "
                              f"({sites[0].name}); leave token_dim unset")
        ids = getattr(config, "prompt_tuning_init_token_ids", None)  # (P-tuning's config has none)
        if ids is not None and max(ids) >= vocab:
            raise ConfigError(f"prompt_tuning_init_token_ids holds id {max(ids)}, outside the input embedding's "
                              f"{vocab} rows ({sites[0].name}): was the tokenizer another model's?")

    # ---------------------------------------------------------------------------------- graph
    @classmethod
    def shared_state(cls, config: PromptTuningConfig, sites: list[Site], adapter_name: str, dtype: torch.dtype,
                     device: torch.device) -> PromptTable:
        # PEFT keeps the prompt encoder in fp32 and casts the prompt to the embeddings' dtype in forward
        held = adapter_dtype(torch.empty((), dtype=dtype), config.keep_base_dtype)
        nv, ids = config.num_virtual_tokens, config.prompt_tuning_init_token_ids
        if ids is not None:  # PEFT's TEXT rule: the text's ids cut to NV, or repeated until there are NV
            ids = (list(ids) * -(-nv // len(ids)))[:nv]
        return PromptTable(nv, sites[0].weight_shape[1], held, device,
                           config.prompt_tuning_init in ("SAMPLE_VOCAB", "TEXT"), ids)

    @classmethod
    def build(cls, site: Site, config: PromptTuningConfig, adapter_name: str,
              weight: torch.Tensor) -> PromptTuningAdapter:
        return PromptTuningAdapter(site, adapter_name, config)

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: PromptTuningAdapter) -> None:
        cls.refuse_second(emit, adapter, PromptTuningAdapter, "prompt")
        ids, pads = _sequence_inputs(emit.gm, site)
        table_mod: PromptTable = emit.gm.get_submodule(Method.shared_path(cls.name, adapter.adapter_name))
        weight = emit.gm.get_parameter(site.weight)
        if table_mod.sample_vocab:  # SAMPLE_VOCAB / TEXT: rows of the embedding at random / the text's ids (PEFT's)
            with torch.no_grad():
                if getattr(table_mod, "init_ids", None) is not None:
                    picks = torch.tensor(table_mod.init_ids, device=weight.device)
                else:
                    picks = torch.randint(0, weight.shape[0], (adapter.num_virtual_tokens,), device=weight.device)
                table_mod.prompt_embeddings.copy_(weight[picks])
            table_mod.sample_vocab = False
        last = [n for n in emit.graph.nodes if n.op == "placeholder"][-1]
        with emit.graph.inserting_before(last.next):  # at the entry: every reader of the inputs comes later
            table, held = cls.prompt_source(emit, table_mod)  # [NV, dim]
            prompt = emit.module("switch", table, label="prompt")  # [NV, dim] (or [0, dim] while off)
            if held != weight.dtype:
                prompt = emit.cast(prompt, weight.dtype)
            nv = emit.op(aten.sym_size.int, prompt, 0, label="num_virtual")
            batch = emit.op(aten.sym_size.int, ids, 0, label="batch")
            for node, fill in [(ids, 0), *pads.items()]:  # [B, T] -> [B, NV+T], the virtual positions first
                longer = emit.op(aten.constant_pad_nd.default, node, [nv, 0], fill, role=Role.OUT, replaces=0,
                                 label=f"{node.name}_with_prompt")
                node.replace_all_uses_with(longer, delete_user_cb=lambda u, lg=longer: u is not lg and not _is_check(u))
            rows = emit.op(aten.expand.default, prompt, [batch, -1, -1], label="prompt_rows")  # [B, NV, dim]
        # the embedding of the lengthened ids [B, NV+T, dim], its first NV positions the prompt
        out = emit.op(aten.slice_scatter.default, emit.call.node, rows, 1, 0, nv, role=Role.OUT, replaces=0,
                      label="with_prompt")
        emit.replace_output(out)

    @classmethod
    def prompt_source(cls, emit: Emit, shared: nn.Module) -> tuple[fx.Node, torch.dtype]:
        """The node giving the prompt rows ``[NV, dim]`` and their dtype: here the shared table read as it is (a
        method computing the rows, such as P-tuning's encoder, overrides it)."""
        return emit.shared(_KEY, label="prompt_table"), shared.prompt_embeddings.dtype

    @classmethod
    def fold(cls, adapter: PromptTuningAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        raise MergeError(f"prompt tuning adapter {adapter.adapter_name!r} cannot be merged: its virtual tokens "
                         "lengthen the input and change no weight, so there is nothing to fold. Keep it unmerged, "
                         "or remove it (fxpeft.remove_adapters) for the base model")

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def shared_shapes(cls, config: PromptTuningConfig, sites: list[Site]) -> dict[str, tuple[int, ...]]:
        return {_KEY: (config.num_virtual_tokens, sites[0].weight_shape[1])}

    @classmethod
    def shared_tensors(cls, shared: PromptTable) -> dict[str, torch.Tensor]:
        return {_KEY: shared.prompt_embeddings}

    @classmethod
    def load_shared_tensors(cls, shared: PromptTable, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            shared.prompt_embeddings.copy_(tensors[_KEY])
        shared.sample_vocab = False

    @classmethod
    def site_settings(cls, config: PromptTuningConfig, site: Site) -> dict[str, Any]:
        return {"num_virtual_tokens": config.num_virtual_tokens}

    @classmethod
    def adapter_settings(cls, adapter: PromptTuningAdapter) -> dict[str, Any]:
        return {"num_virtual_tokens": adapter.num_virtual_tokens}

    @classmethod
    def config_fields(cls, adapters: dict[str, PromptTuningAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        (ad,) = adapters.values()
        # no target_modules (peft_absent_fields): the site is the input embedding, found again on load
        text = getattr(ad, "text_init", {})
        named = bool(text.get("prompt_tuning_init_text") and text.get("tokenizer_name_or_path"))
        init = ad.init if ad.init != "TEXT" or named else "RANDOM"  # PEFT's config refuses TEXT without both
        text = text if init == "TEXT" else {}
        return {"num_virtual_tokens": ad.num_virtual_tokens, "token_dim": ad.token_dim,
                "num_transformer_submodules": 1, "prompt_tuning_init": init,
                "prompt_tuning_init_text": text.get("prompt_tuning_init_text"),
                "tokenizer_name_or_path": text.get("tokenizer_name_or_path"),
                "tokenizer_kwargs": text.get("tokenizer_kwargs")}
