"""Which sites a config adapts: PEFT's ``target_modules`` / ``exclude_modules`` rules, over a graph's sites.

* a list: a site matches an entry equal to its name or to its last dotted components;
* a string: a regex that must full-match the name (run by a linear-time engine: configs can come from files);
* ``"all-linear"``: every linear site, but the output head of a transformers model (PEFT's rule).
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import torch
from torch import fx

from .errors import TargetError
from .sites import Site, find_sites, unreached_weights
from .tags import graph_info
from .untrusted import fullmatch

__all__ = ["matches", "select_sites", "output_heads", "default_targets"]


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


def select_sites(gm: fx.GraphModule, config: Any, method, sites: dict[str, Site] | None = None) -> list[Site]:
    """Resolve ``config.target_modules`` / ``exclude_modules`` to sites, with PEFT's matching rules.

    Raises:
        TargetError: a target entry matches no site, or nothing is left to adapt (the message lists near
            candidates and the fix).
    """
    sites = find_sites(gm) if sites is None else sites
    targets = _check_spec(config.target_modules, "target_modules")
    excl = _check_spec(getattr(config, "exclude_modules", None), "exclude_modules")
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
    if excl:
        chosen = [s for s in chosen if not matches(excl, s.name, "exclude_modules")]
        if not chosen:
            raise TargetError(f"exclude_modules {excl!r} excludes every targeted site; nothing would be adapted")
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


