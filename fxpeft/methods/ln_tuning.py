"""LN tuning: train a per-adapter copy of each targeted normalization layer's affine weight (and bias),
interchangeable with HF PEFT's ``LNTuningConfig`` (https://huggingface.co/papers/2312.11420). One file: config,
sites, nodes, fold, and PEFT's file format.

PEFT wraps each targeted module and runs a trainable deep copy of it in its place. fxpeft's sites of kind
``"norm"`` (:func:`fxpeft.sites.find_sites`) are the same modules seen in the graph: ``nn.LayerNorm`` /
``GroupNorm`` / ``RMSNorm`` and the ``layer_norm`` / ``group_norm`` / ``rms_norm`` ops, and decomposed RMS norms
(HF ``LlamaRMSNorm``: ``weight * x`` inside a module that computes an ``rsqrt``). In the graph:

* where the call reads its weight as a graph value (export graphs, traced-through norms), it reads
  ``where(gate, copy, W)`` instead of ``W``, and the same for the bias: one normalization, as before;
* at a ``call_module`` norm (a symbolic_trace graph), the output is ``where(gate, norm(x; copies), y)``: the
  functional form of the module with the copies, and the base output ``y`` while the adapter is off (the base call
  still runs there: the norm costs twice, which keeps the opaque module and its output untouched).

Merging writes the copies into the base tensors (PEFT swaps the copy in); ``merge_adapter`` keeps the base values
for ``unmerge_adapter``. PEFT runs one LN tuning adapter at a time (``set_adapter`` switches): adapters on one norm
chain their ``where``s, so the active one is used; with two active, fxpeft uses the first added where PEFT raises.

PEFT can also target modules that are not norms (a whole ``lm_head`` or an MLP, as its LLaVA defaults do); fxpeft
refuses those sites with :class:`~fxpeft.UnsupportedSiteError` (train them with ``modules_to_save``).

PEFT's file layout: ``base_model.model.<module>.ln_tuning_layers.weight`` (and ``.bias``), each the module's full
tuned tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import MergeError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Site, _see_through
from fxpeft.tags import Role

__all__ = ["LNTuningConfig", "LNTuningAdapter", "LNTuning"]

aten = torch.ops.aten
_KEY = "ln_tuning_layers"  # PEFT's attribute holding the copies: the file keys' infix


@dataclass
class LNTuningConfig(PeftConfigBase):
    """LN tuning settings, with HF PEFT's field names (``peft.LNTuningConfig``).

    Args:
        target_modules: the normalization modules to tune (a list of names matched as suffixes, or a regex); unset:
            PEFT's defaults for the model type (Llama: ``input_layernorm``, ``post_attention_layernorm``, ``norm``).
        exclude_modules: modules to skip.
        modules_to_save: other modules trained whole (as in every PEFT method).

    Example:
        >>> import torch, fxpeft
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> gm = fxpeft.rewrite(fxpeft.trace(net), fxpeft.LNTuningConfig(target_modules=["1"]))
        >>> sorted(n for n, p in gm.named_parameters() if p.requires_grad)
        ['1.ln_tuning_default.bias', '1.ln_tuning_default.weight']
    """


class LNTuningAdapter(AdapterModule):
    """One adapter's trainable copy of a norm's ``weight`` (and ``bias``), in the base tensors' dtype (as PEFT).

    Attributes:
        weight / bias: the copies (``bias`` is None where the norm has none).
        stash: the base values while the adapter is folded in (``merge_adapter``), for ``unmerge_adapter``.
    """

    method = "ln_tuning"

    def __init__(self, site: Site, adapter_name: str, weight: torch.Tensor) -> None:
        super().__init__(site.name, adapter_name)
        self.weight = nn.Parameter(weight.detach().clone())
        # The bias copy is filled from the base bias when the adapter enters the graph (build sees the weight only).
        self.bias = nn.Parameter(torch.zeros_like(self.weight)) if site.bias is not None else None
        self.bias_pending = site.bias is not None
        self.stash: dict[str, torch.Tensor] = {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The copies by PEFT's parameter name."""
        return {"weight": self.weight, **({"bias": self.bias} if self.bias is not None else {})}


def _base_read(node: fx.Node, target: str) -> fx.Node | None:
    """The argument of ``node`` that reads the parameter ``target`` (directly, or through other adapters)."""
    for arg in node.all_input_nodes:
        base, _ = _see_through(arg)
        if base.op == "get_attr" and base.target == target:
            return arg
    return None


@PeftRegistry.register("ln_tuning")
class LNTuning(Method):
    config_cls = LNTuningConfig
    display_name = "LN tuning"
    color = ("#ffec99", "#e67700")
    site_kinds = frozenset({"norm"})
    # used when peft is not installed; with it, PEFT's own table (more model families) wins
    default_targets = {"llama": ["input_layernorm", "post_attention_layernorm", "norm"],
                       "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
                       "gpt2": ["ln_1", "ln_2", "ln_f"], "t5": ["layer_norm", "final_layer_norm"]}
    peft_default_table = "TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING"

    @classmethod
    def check_site(cls, site: Site, config: LNTuningConfig) -> str | None:
        if site.kind != "norm":
            return (f"fxpeft's LN tuning tunes normalization layers, not a whole {site.kind} module "
                    f"({site.module_type}); train it with modules_to_save instead")
        return None

    @classmethod
    def build(cls, site: Site, config: LNTuningConfig, adapter_name: str, weight: torch.Tensor) -> LNTuningAdapter:
        return LNTuningAdapter(site, adapter_name, weight)

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: LNTuningAdapter) -> None:
        if adapter.bias_pending:
            with torch.no_grad():
                adapter.bias.copy_(emit.gm.get_parameter(site.bias))
            adapter.bias_pending = False
        gate = emit.param("gate", Role.GATE)
        if emit.call.weight_node is None:
            cls._insert_module(emit, site, adapter, gate)
            return
        # The call reads W (and b) as graph values: it reads where(gate, copy, W) instead.
        emit.replace_input(emit.call.weight_node, cls._tuned(emit, gate, "weight", emit.call.weight_node))
        bias = _base_read(emit.call.node, site.bias) if site.bias is not None else None
        if bias is not None:
            with emit.graph.inserting_before(emit.call.node):
                new = cls._tuned(emit, gate, "bias", bias)
            emit.call.node.replace_input_with(bias, new)

    @staticmethod
    def _tuned(emit: Emit, gate: fx.Node, attr: str, base: fx.Node) -> fx.Node:
        """``where(gate, copy, base)``: the copy while the adapter is on, the base tensor while off or merged."""
        copy = emit.param(attr, label=f"tuned_{attr}")
        return emit.op(aten.where.self, gate, copy, base, role=Role.OUT, replaces=2, label=f"adapted_{attr}")

    @classmethod
    def _insert_module(cls, emit: Emit, site: Site, adapter: LNTuningAdapter, gate: fx.Node) -> None:
        """A ``call_module`` norm: ``where(gate, norm(x; copies), y)``, the module's functional form."""
        mod = emit.gm.get_submodule(site.name)
        x, w = emit.call.input, emit.param("weight", label="tuned_weight")
        b = emit.param("bias", label="tuned_bias") if adapter.bias is not None else None
        if isinstance(mod, nn.LayerNorm):
            y = emit.op(aten.layer_norm.default, x, list(mod.normalized_shape), w, b, mod.eps, label="tuned")
        elif isinstance(mod, nn.GroupNorm):
            y = emit.op(aten.group_norm.default, x, mod.num_groups, w, b, mod.eps, label="tuned")
        else:  # nn.RMSNorm (find_sites reaches no other module)
            y = emit.op(aten.rms_norm.default, x, list(mod.normalized_shape), w, mod.eps, label="tuned")
        emit.replace_output(emit.op(aten.where.self, gate, y, emit.call.node, role=Role.OUT, replaces=2, label="out"))

    @classmethod
    def fold(cls, adapter: LNTuningAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        # PEFT's merge swaps the copy in for the base module: the base values are kept for unfold.
        adapter.stash = {"weight": weight.clone(), **({"bias": bias.clone()} if bias is not None else {})}
        return adapter.weight.detach().float(), None if bias is None else adapter.bias.detach().float()

    @classmethod
    def unfold(cls, adapter: LNTuningAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        if not adapter.stash:
            raise MergeError(f"the LN tuning adapter {adapter.adapter_name!r} at {site.name!r} holds no base values "
                             "to restore (it was not folded in by merge_adapter); nothing was changed")
        stash, adapter.stash = adapter.stash, {}
        return stash["weight"], stash.get("bias", bias)

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: LNTuningConfig, site: Site) -> dict[str, tuple[int, ...]]:
        return {f"{_KEY}.{k}": site.weight_shape for k in ("weight", "bias") if k == "weight" or site.bias}

    @classmethod
    def site_tensors(cls, adapter: LNTuningAdapter, site: Site) -> dict[str, torch.Tensor]:
        return {f"{_KEY}.{k}": t.detach() for k, t in adapter.tensors().items()}

    @classmethod
    def load_site_tensors(cls, adapter: LNTuningAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, t in adapter.tensors().items():
                t.copy_(tensors[f"{_KEY}.{k}"])

    @classmethod
    def swap_in(cls, adapter: LNTuningAdapter, site: Site, config: Any, tensors: dict[str, torch.Tensor]) -> None:
        cls.load_site_tensors(adapter, site, tensors)  # the shapes are the norm's: a file always fits
