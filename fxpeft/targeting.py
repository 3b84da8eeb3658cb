"""Which sites a config adapts: PEFT's ``target_modules`` / ``exclude_modules`` rules, over a graph's sites.

* a list: a site matches an entry equal to its name or to its last dotted components;
* a string: a regex that must full-match the name (run by a linear-time engine: configs can come from files);
* ``"all-linear"``: every linear site, but the output head of a transformers model (PEFT's rule);
* ``layers_to_transform`` / ``layers_pattern``: a list entry matched as a suffix (not the exact name) keeps a site
  only if its layer index is listed; the index is the first all-digit name component with two components before
  it, or the one right after a ``layers_pattern`` component (PEFT's ``check_target_module_exists``);
* ``modules_to_save`` (and the modules a ``task_type`` adds to it) are never targeted, nor is anything inside them.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import torch
from torch import fx

from .errors import ConfigError, TargetError
from .sites import CALL_KINDS, Site, find_sites, unreached_weights
from .tags import graph_info
from .untrusted import _compile, fullmatch

__all__ = ["matches", "select_sites", "output_heads", "default_targets", "layer_index", "saved_names", "check_fields",
           "TASK_MODULES"]

#: modules PEFT's task models add to ``modules_to_save`` (``PeftModelForSequenceClassification`` & co.)
TASK_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                "QUESTION_ANS": ("qa_outputs",)}
#: PEFT's ``TaskType`` values
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def matches(spec: list[str] | str, name: str, field: str = "target_modules") -> bool:
    """PEFT's matching rule for ``target_modules`` / ``exclude_modules``."""
    if isinstance(spec, str):
        return fullmatch(spec, name, field=field)
    return any(name == t or name.endswith(f".{t}") for t in spec)


def default_targets(method, model_type: str | None) -> list[str] | None:
    """PEFT's own per-model defaults when peft is installed (it knows ~40 families), else the method's table."""
    if method.peft_default_table:
        try:
            from peft.utils import constants

            table = getattr(constants, method.peft_default_table)
            if model_type in table:
                return list(table[model_type])
        except (ImportError, AttributeError):
            pass
    own = method.default_targets.get(model_type)
    return list(own) if own is not None else None


def output_heads(gm: fx.GraphModule, sites: dict[str, Site]) -> set[str]:
    """The output head that ``"all-linear"`` leaves out: the output embedding of a transformers model.

    PEFT leaves the head out only for ``PreTrainedModel``s; on any other model every linear is adapted.
    """
    head = graph_info(gm).output_head
    return {head} if head else set()


def _check_spec(spec: Any, field: str) -> list[str] | str | None:
    """Type-check a targeting field: a list of names, a regex string, or None."""
    if spec is None or isinstance(spec, str):
        if isinstance(spec, str):
            fullmatch(spec, "", field=field)  # compiles it now: a bad or unsafe regex fails before any change
        return spec
    if isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in spec):
        return sorted(spec) if isinstance(spec, (set, frozenset)) else list(spec)
    raise TargetError(f"{field} must be a list of module names or a regex string, got {spec!r}; "
                      "e.g. target_modules=['q_proj', 'v_proj']")


def saved_names(config: Any) -> list[str]:
    """The config's ``modules_to_save`` plus the modules its ``task_type`` adds, as PEFT's task models do.

    Raises:
        ConfigError: ``modules_to_save`` is not a list of non-empty names, or ``task_type`` is not one of PEFT's.
    """
    names = getattr(config, "modules_to_save", None)
    if names is not None and (isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset))
                              or not all(isinstance(n, str) and n for n in names)):
        raise ConfigError(f"modules_to_save must be a list of module names, got {names!r}; e.g. ['classifier']")
    task = getattr(config, "task_type", None)
    if task is not None and task not in TASK_TYPES:
        raise ConfigError(f"task_type={task!r} is not one of PEFT's task types {list(TASK_TYPES)}")
    names = sorted(names) if isinstance(names, (set, frozenset)) else list(names or ())
    return list(dict.fromkeys([*names, *TASK_MODULES.get(task, ())]))


def _in_saved(saved: list[str], name: str) -> bool:
    r"""PEFT's guard: ``re.match(rf"(^|.*\.){m}($|\..*)", name)`` for an entry ``m`` (the module or inside it)."""
    return any(_compile(rf"(^|.*\.){m}($|\..*)", "modules_to_save", m).match(name) for m in saved)


def _plain(pattern: str) -> bool:
    return all(ch.isalnum() or ch in "_-" for ch in pattern)


def layer_index(name: str, layers_pattern: list[str] | str | None = None) -> int | None:
    r"""The layer index PEFT reads off a module name for ``layers_to_transform``, or None.

    Without ``layers_pattern``: ``re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)``, the first all-digit component
    with at least two components before it and one after. With it (each pattern in turn):
    ``re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)``, matched by the linear-time engine.

    Raises:
        ConfigError: a regex ``layers_pattern`` that matches before several numbered components of one name (PEFT's
            pick then depends on backtracking order); use the plain component name, e.g. ``"layers"``.

    Example:
        >>> layer_index("model.layers.3.self_attn.q_proj"), layer_index("model.layers.3.mlp.experts.1.w", "layers")
        (3, 3)
    """
    parts = name.split(".")
    offsets, at = [], 0
    for part in parts:
        offsets.append(at)
        at += len(part) + 1
    numbered = [k for k in range(1, len(parts) - 1) if parts[k].isdecimal()]  # followed by a component
    if not layers_pattern:
        k = next((k for k in numbered if k >= 2), None)
        return None if k is None else int(parts[k])
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        before = _compile(rf"(?:^|.*?\.){pattern}\.", "layers_pattern", pattern)
        hits = [k for k in numbered if before.fullmatch(name[: offsets[k]])]
        if len(hits) > 1 and not _plain(pattern):
            raise ConfigError(f"layers_pattern {pattern!r} matches before several numbered components of {name!r}; "
                              "which one PEFT picks depends on regex backtracking. Use the plain name of the layer "
                              "list, e.g. 'layers'")
        if hits:
            return int(parts[hits[0]])
    return None


def check_fields(config: Any) -> None:
    """Check the targeting fields every method's config has (``layers_to_transform``, ``layers_pattern``,
    ``modules_to_save``, ``task_type``), as PEFT's config does.

    Raises:
        ConfigError: naming the field.
    """
    saved_names(config)
    _check_layers(config, getattr(config, "target_modules", None))


def _check_layers(config: Any, targets) -> tuple[set[int], Any] | None:
    """``(indices, layers_pattern)`` when ``layers_to_transform`` is in use, else None (checked as PEFT does)."""
    indices = getattr(config, "layers_to_transform", None)
    pattern = getattr(config, "layers_pattern", None)
    if indices is not None and not (isinstance(indices, int) and not isinstance(indices, bool) or isinstance(
            indices, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in indices)):
        raise ConfigError(f"layers_to_transform must be a layer index or a list of them, got {indices!r}")
    if pattern is not None and not (isinstance(pattern, str) or isinstance(pattern, (list, tuple)) and all(
            isinstance(p, str) for p in pattern)):
        raise ConfigError(f"layers_pattern must be a name or a list of names, got {pattern!r}")
    if isinstance(targets, str) and (indices is not None or pattern is not None):
        raise ConfigError("layers_to_transform/layers_pattern cannot be used with a string target_modules (a regex or "
                          "'all-linear'), as in PEFT; list the module names, or write the layers into the regex")
    if pattern and indices is None:
        raise ConfigError("layers_pattern is set but layers_to_transform is not; set both (as PEFT requires)")
    for p in [pattern] if isinstance(pattern, str) else pattern or ():
        _compile(rf"(?:^|.*?\.){p}\.", "layers_pattern", p)  # a bad or unsafe regex fails before any change
    if indices is None or isinstance(indices, (list, tuple)) and not indices:
        return None
    return ({indices} if isinstance(indices, int) else set(indices)), pattern


def _filter_layers(chosen: list[Site], targets: list[str], layers) -> list[Site]:
    """Keep exact entries and the sites in the listed layers; an index no targeted module has is an error."""
    indices, pattern = layers
    found = {s.name: layer_index(s.name, pattern) for s in chosen if s.name not in targets}
    have = sorted({i for i in found.values() if i is not None})
    missing = sorted(indices - set(have))
    if missing:
        where = f"in layers {have}" if have else "in no numbered layer" + (
            f" (layers_pattern={pattern!r} finds none)" if pattern else "")
        raise TargetError(f"layers_to_transform {missing} out of range: the targeted modules are {where}; "
                          "pass indices of existing layers" + ("" if have else ", or set layers_pattern to the name "
                                                               "of the layer list (e.g. 'layers', 'h')"))
    kept = [s for s in chosen if s.name in targets or found[s.name] in indices]
    if not kept:
        raise TargetError(f"layers_to_transform={sorted(indices)} leaves no targeted site to adapt")
    return kept


def select_sites(gm: fx.GraphModule, config: Any, method, sites: dict[str, Site] | None = None) -> list[Site]:
    """Resolve ``config.target_modules`` / ``exclude_modules`` to sites, with PEFT's matching rules.

    Raises:
        TargetError: a target entry matches no site, or nothing is left to adapt (the message lists near
            candidates and the fix).
    """
    sites = find_sites(gm, CALL_KINDS | method.site_kinds) if sites is None else sites
    return method.select_sites(gm, config, sites, lambda c: _select_by_rules(gm, c, method, sites))


def _select_by_rules(gm: fx.GraphModule, config: Any, method, sites: dict[str, Site]) -> list[Site]:
    """PEFT's generic target rules (what :func:`select_sites` gives a method's ``select_sites`` hook)."""
    targets = _check_spec(config.target_modules, "target_modules")
    excl = _check_spec(getattr(config, "exclude_modules", None), "exclude_modules")
    saved = saved_names(config)
    layers = _check_layers(config, targets)
    if targets is None:
        model_type = graph_info(gm).model_type
        targets = default_targets(method, model_type)
        if targets is None:
            raise TargetError(
                f"target_modules is not set and fxpeft has no default for model type {model_type!r}; "
                f"pass target_modules, e.g. {sorted({n.rsplit('.', 1)[-1] for n in sites})[:6]} or 'all-linear'")
    if isinstance(targets, str) and targets.lower() in ("all-linear", "all_linear"):
        heads = output_heads(gm, sites)
        chosen = [s for s in sites.values() if s.kind == "linear" and s.name not in heads]
        if not chosen:
            raise TargetError("target_modules='all-linear' found no linear site to adapt"
                              + (f" (the only one, {sorted(heads)}, is the output head)" if heads else "")
                              + "; name the sites to adapt. " + _near("", gm, sites))
    else:
        if not isinstance(targets, str):
            if not targets:
                raise TargetError("target_modules is empty; name at least one site, or use 'all-linear'")
            missing = [t for t in targets if not any(matches([t], n) for n in sites)]
            if missing:
                raise TargetError(f"target_modules entry {missing[0]!r} matches no targetable site." + _near(missing[0], gm, sites))
        chosen = [s for s in sites.values() if matches(targets, s.name)]
        if not chosen:
            raise TargetError(f"target_modules {targets!r} matches no targetable site." + _near(str(targets), gm, sites))
        if layers is not None:
            chosen = _filter_layers(chosen, targets, layers)
    if excl:
        chosen = [s for s in chosen if not matches(excl, s.name, "exclude_modules")]
        if not chosen:
            raise TargetError(f"exclude_modules {excl!r} excludes every targeted site; nothing would be adapted")
    if saved:
        chosen = [s for s in chosen if not _in_saved(saved, s.name)]
        if not chosen:
            raise TargetError(f"every targeted site is in modules_to_save {saved}; a module saved whole is not "
                              "also adapted (as in PEFT). Target other modules")
    if not (isinstance(targets, str) and targets.lower() in ("all-linear", "all_linear")):
        _warn_unreached(gm, targets, excl, sites)
    return chosen


def _warn_unreached(gm: fx.GraphModule, targets, excl, sites: dict[str, Site]) -> None:
    """Say which targeted modules own weights that no site reaches (they would be skipped silently)."""
    candidates = [m for m, mod in gm.named_modules() if m and m not in sites and any(True for _ in mod.parameters(False))
                  and matches(targets, m) and not (excl and matches(excl, m, "exclude_modules"))]
    if not candidates:
        return
    unreached = unreached_weights(gm, sites)
    hit = {p: why for p, why in unreached.items() if p.rpartition(".")[0] in candidates}
    if hit:
        lines = "; ".join(f"{p} ({why})" for p, why in list(hit.items())[:4])
        warnings.warn(f"target_modules matches modules whose weights no site reaches, so they are not adapted: {lines}"
                      f"{' ...' if len(hit) > 4 else ''}. fxpeft.list_sites(gm, with_unreached=True) lists them all.")


def _near(target: str, gm: fx.GraphModule, sites: dict[str, Site]) -> str:
    """Near candidates for a target that matched nothing, and why a module of that name is not a site."""
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
            why = {p: w for p, w in unreached_weights(gm, sites).items() if p.rpartition(".")[0] == m}
            msg += f" {m!r} exists but applies no linear/conv/embedding weight of its own" + (
                f": {'; '.join(f'{p} is {w}' for p, w in why.items())}." if why else ".")
    if close:
        msg += f" Did you mean one of {close}?"
    return msg + f" Targetable sites: {leaves[:12]}{' ...' if len(leaves) > 12 else ''}; fxpeft.list_sites(gm) lists all {len(names)}."


