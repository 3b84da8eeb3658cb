"""The inject pass: target sites, validate everything, then insert one method's adapter subgraphs.

Nothing in the graph or the module changes until every check has passed, so a failed rewrite leaves
``gm.code`` and ``gm.state_dict()`` exactly as they were.
"""

from __future__ import annotations

import copy
import difflib
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpeft.errors import AdapterExistsError, ConfigError, TargetError, UnsupportedSiteError
from fxpeft.registry import AdapterModule, Emit, PeftRegistry
from fxpeft.sites import FXPEFT_META, Site, find_sites, graph_dialect

__all__ = ["InjectAdapter", "select_sites", "adapter_tags", "adapter_modules", "freeze_base", "output_heads"]

# Defaults when ``target_modules`` is None, by HF ``model_type`` (PEFT's choices for the common families).
_DEFAULT_TARGETS = {
    "lora": {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
             "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "phi3": ["qkv_proj"],
             "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
             "opt": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "t5": ["q", "v"]},
    "ia3": {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
            "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["key", "value", "output.dense"],
            "roberta": ["key", "value", "output.dense"], "t5": ["k", "v", "wo"]},
}
_DEFAULT_FF = {"llama": ["down_proj"], "mistral": ["down_proj"], "gpt2": ["mlp.c_proj"],
               "bert": ["output.dense"], "roberta": ["output.dense"], "t5": ["wo"]}


def _default_targets(method: str, model_type: str | None) -> list[str] | None:
    """PEFT's own per-model defaults when peft is installed (it knows ~40 families), else fxpeft's table."""
    try:
        from peft.utils import constants as c

        table = {"lora": c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
                 "ia3": c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
                 "ia3_ff": c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING}[method]
        if model_type in table:
            return list(table[model_type])
    except (ImportError, AttributeError, KeyError):
        pass
    own = _DEFAULT_FF if method == "ia3_ff" else _DEFAULT_TARGETS.get(method, {})
    return own.get(model_type)


def _matches(spec: list[str] | str, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in spec)


def output_heads(gm: fx.GraphModule, sites: dict[str, Site]) -> set[str]:
    """The output head(s) that ``"all-linear"`` leaves out.

    For an HF model, :func:`fxpeft.trace` records ``get_output_embeddings()``; for any other model, a head is
    a linear site whose output reaches the graph output without passing through another site.
    """
    recorded = getattr(gm, "meta", {}).get("fxpeft_output_head", False)
    if recorded is not False:
        return {recorded} if recorded else set()
    site_nodes = {c.node for s in sites.values() for c in s.calls}
    heads = set()
    for site in sites.values():
        if site.kind != "linear":
            continue
        stack, seen = [u for c in site.calls for u in c.node.users], set()
        while stack:
            n = stack.pop()
            if n in seen or n in site_nodes:
                continue
            seen.add(n)
            if n.op == "output":
                heads.add(site.name)
                break
            stack.extend(n.users)
    return heads


def _near(target: str, gm: fx.GraphModule, sites: dict[str, Site]) -> str:
    names = list(sites)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(target, leaves, n=4, cutoff=0.5) or difflib.get_close_matches(
        target, names, n=4, cutoff=0.5)
    modules = {p for n in gm.graph.nodes for p, _ in (n.meta.get("nn_module_stack") or {}).values()}
    modules |= {m for m, _ in gm.named_modules()}
    not_site = sorted(m for m in modules if m and (m == target or m.endswith(f".{target}")) and m not in sites)
    msg = ""
    if not_site:
        m = not_site[0]
        leaves_called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        outer = next((c for c in leaves_called if m.startswith(f"{c}.")), None)
        mod = gm.get_submodule(m) if m in dict(gm.named_modules()) else None
        if outer is not None:  # symbolic_trace kept the enclosing module opaque
            msg += (f" {m!r} sits inside {outer!r}, which the graph calls as one opaque module; trace with example "
                    "inputs (fxpeft.trace(model, args, kwargs)) to see inside it.")
        elif isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and mod.padding_mode != "zeros":
            msg += (f" {m!r} pads with padding_mode={mod.padding_mode!r}, which a symbolic_trace site cannot see; "
                    "trace with example inputs, where the padding is its own op.")
        else:
            msg += f" {m!r} exists but applies no linear/conv/embedding weight of its own."
    if close:
        msg += f" Did you mean one of {close}?"
    return msg + f" Targetable sites: {leaves[:12]}{' ...' if len(leaves) > 12 else ''}; fxpeft.list_sites(gm) lists all {len(names)}."


def select_sites(gm: fx.GraphModule, config: Any, method: str, sites: dict[str, Site] | None = None) -> list[Site]:
    """Resolve ``config.target_modules`` / ``exclude_modules`` to sites, with PEFT's matching rules.

    Raises:
        TargetError: a target entry matches no site (the message lists near candidates).
    """
    sites = find_sites(gm) if sites is None else sites
    targets = config.target_modules
    if targets is None:
        model_type = getattr(gm, "meta", {}).get("fxpeft_model_type")
        targets = _default_targets(method, model_type)
        if targets is None:
            raise TargetError(
                f"target_modules is not set and fxpeft has no default for model type {model_type!r}; "
                f"pass target_modules, e.g. {sorted({n.rsplit('.', 1)[-1] for n in sites})[:6]} or 'all-linear'")
        if method == "ia3" and getattr(config, "feedforward_modules", None) is None:
            config.feedforward_modules = _default_targets("ia3_ff", model_type)
    if isinstance(targets, str) and targets.lower() in ("all-linear", "all_linear"):
        heads = output_heads(gm, sites)
        chosen = [s for s in sites.values() if s.kind == "linear" and s.name not in heads]
    else:
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise TargetError(f"target_modules regex {targets!r} does not compile: {e}") from None
        else:
            targets = list(targets)
            if not targets:
                raise TargetError("target_modules is empty; name at least one site, or use 'all-linear'")
            missing = [t for t in targets if not any(_matches([t], n) for n in sites)]
            if missing:
                raise TargetError(f"target_modules entry {missing[0]!r} matches no targetable site." + _near(missing[0], gm, sites))
        chosen = [s for s in sites.values() if _matches(targets, s.name)]
        if not chosen:
            raise TargetError(f"target_modules {targets!r} matches no targetable site." + _near(str(targets), gm, sites))
    excl = getattr(config, "exclude_modules", None)
    if excl:
        chosen = [s for s in chosen if not _matches(excl, s.name)]
        if not chosen:
            raise TargetError(f"exclude_modules {excl!r} excludes every targeted site; nothing would be adapted")
    return chosen


def adapter_tags(gm: fx.GraphModule) -> dict[str, dict]:
    """Map each adapter module path to its tag (method, adapter, site, module) and its nodes, in graph order."""
    found: dict[str, dict] = {}
    for n in gm.graph.nodes:
        tag = n.meta.get(FXPEFT_META)
        if tag is None or "module" not in tag:
            continue
        entry = found.setdefault(tag["module"], {k: tag[k] for k in ("method", "adapter", "site", "module")} | {"nodes": []})
        entry["nodes"].append(n)
    return found


def adapter_modules(gm: fx.GraphModule) -> dict[str, AdapterModule]:
    """Every adapter submodule of ``gm``, by path."""
    return {name: m for name, m in gm.named_modules() if isinstance(m, AdapterModule)}


def freeze_base(gm: torch.nn.Module) -> None:
    """Make adapter parameters trainable and every other parameter frozen."""
    adapter_params = {id(p) for m in gm.modules() if isinstance(m, AdapterModule) for p in m.parameters()}
    for p in gm.parameters():
        p.requires_grad_(id(p) in adapter_params)


def _adapter_path(gm: fx.GraphModule, site: Site, method: str, adapter_name: str) -> str:
    """Adapters hang off the owning module: ``<site>.lora_default``; for a bare parameter ``<parent>.<param>_lora_default``."""
    leaf = f"{method}_{adapter_name}"
    try:
        owner = gm.get_submodule(site.name)
        return f"{site.name}.{leaf}" if owner is not None else leaf
    except AttributeError:
        parent, _, attr = site.name.rpartition(".")
        return f"{parent}.{attr}_{leaf}" if parent else f"{attr}_{leaf}"


@dataclass(frozen=True)
class InjectAdapter:
    """Insert one adapter (of the method ``config`` belongs to) at every targeted site.

    Args:
        config: a registered method config (:class:`fxpeft.LoraConfig`, :class:`fxpeft.IA3Config`).
        adapter_name: key of this adapter; one site can hold several adapters under different names.

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes.inject import InjectAdapter
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> InjectAdapter(fxpeft.LoraConfig(r=2, target_modules=["0"]))(gm).modified
        True
    """

    config: Any
    adapter_name: str = "default"
    recompile: bool = True  # False when a later pass in the same pipeline regenerates the code anyway

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        method = PeftRegistry.for_config(self.config)
        config = copy.copy(self.config)  # defaults filled in below must not leak into the caller's object
        if not (isinstance(self.adapter_name, str) and self.adapter_name.isidentifier()):
            raise ConfigError(f"adapter_name {self.adapter_name!r} must be a Python identifier, e.g. 'default'")
        method.validate_config(config)
        sites = find_sites(gm)
        chosen = select_sites(gm, config, method.name, sites)
        bad = [(s.name, why) for s in chosen if (why := method.check_site(s, config))]
        if bad:
            lines = "; ".join(f"{n}: {w}" for n, w in bad[:5])
            raise UnsupportedSiteError(
                f"{len(bad)} targeted site(s) cannot take {method.name}: {lines}. "
                "Narrow target_modules or add these to exclude_modules.")
        existing = adapter_tags(gm).values()
        for s in chosen:
            for tag in existing:
                if tag["site"] != s.name:
                    continue
                if tag["adapter"] == self.adapter_name:
                    raise AdapterExistsError(
                        f"site {s.name!r} already holds adapter {self.adapter_name!r} ({tag['method']}); "
                        "pass another adapter_name, or merge/remove the existing one first")
                if tag["method"] != method.name:
                    raise AdapterExistsError(
                        f"site {s.name!r} already holds a {tag['method']} adapter; mixing {tag['method']} and "
                        f"{method.name} on one site is not supported (their composition order would be ambiguous)")
        paths = {s.name: _adapter_path(gm, s, method.name, self.adapter_name) for s in chosen}
        for s in chosen:
            parent, _, leaf = paths[s.name].rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            if hasattr(owner, leaf):
                raise AdapterExistsError(f"attribute {paths[s.name]!r} already exists; pick another adapter_name")
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(config, field, None) or {}:
                if not any(re.match(rf"(.*\.)?({key})$", s.name) for s in chosen):
                    warnings.warn(f"{field} key {key!r} matches none of the {len(chosen)} targeted sites; it has no effect")
        adapters = {s.name: method.build(s, config, self.adapter_name, gm.get_parameter(s.weight)) for s in chosen}

        # ---- validated: mutate from here on ----
        dialect = graph_dialect(gm)
        for s in chosen:
            gm.add_submodule(paths[s.name], adapters[s.name])
            for call in s.calls:
                emit = Emit(gm, dialect, method.name, self.adapter_name, s.name, paths[s.name], anchor=call.node)
                with gm.graph.inserting_before(call.node.next):
                    method.insert(emit, call, s, adapters[s.name])
        freeze_base(gm)
        gm.graph.lint()
        if self.recompile:
            gm.recompile()
        return PassResult(gm, bool(chosen))

