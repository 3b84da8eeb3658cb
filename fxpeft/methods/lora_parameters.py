"""LoRA on parameters: PEFT's ``LoraConfig(target_parameters=[...])`` (its ``ParamWrapper``), on fxpeft's
``"parameter"`` sites (:func:`fxpeft.sites.find_sites`): the update is added to the parameter's value before *all* of
its uses, whatever ops read it (a transpose into ``grouped_mm``, ``bmm``, slices, views, indexing)::

    2-D  W [out, in]:            A [r, in],    B [out, r],    W' = W + s·B·A
    3-D  W [E, out, in]:         A [r·E, in],  B [out, r·E],  W'[e] = W[e] + s·B_e·A_e
         A_e = A.view(E, r, in)[e],   B_e = B.view(out, r, E)[:, :, e]   (B's columns ordered (rank, expert))
    3-D  W [E, in, out] (the owning module's ``is_transposed``): the same with ``W'[e] = W[e] + s·(B_e·A_e)ᵀ``

As in PEFT, ``lora_dropout``, ``fan_in_fan_out``, ``lora_bias`` and DoRA are refused with ``target_parameters`` (the
update is a weight, not a function of one input, so there is no input to drop out), and so are 1-D parameters and
the inits that read a matrix (PiSSA, OLoRA, orthogonal, MiCA). Several targeted parameters of one module nest in
PEFT's files (``<module>.base_layer.lora_A.weight`` for all but the last in the module's registration order):
:func:`file_names` writes and reads that layout.

``nn.MultiheadAttention`` named in ``target_modules`` is adapted as PEFT adapts it (its ``lora.MultiheadAttention``):
LoRA on ``in_proj_weight`` (``[3E, E]``) and on ``out_proj.weight``, both as weight updates read by every use (PEFT
merges them for each forward; a dropout does not apply there, in PEFT either). File keys: ``<mha>.lora_A.weight``
and ``<mha>.base_layer.out_proj.lora_A.weight``. An MHA with separate q/k/v weights (``kdim``/``vdim`` !=
``embed_dim``, which PEFT refuses) is adapted on ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` and
``out_proj.weight`` (plain scaling) and merges exactly; an ``out_proj`` adapted alone (``target_modules=["out_proj"]``:
fxpeft adapts the call inside the MHA, PEFT silently never applies it) is adapted too. ``save_adapter`` refuses both
(PEFT's format cannot say them, and PEFT must never load them silently).

A conv weight read directly (Mamba's depthwise ``conv1d.weight``, read through a squeeze) is a parameter site seen
as conv LoRA sees it: ``W [out, in, *k]``, ``A [r, in·k]``, ``B [out, r]``, ``W' = W + s·(B·A).view(W.shape)``.
PEFT's format would read such a 3-D parameter as experts, so ``save_adapter`` refuses it.

This module holds LoRA's parameter-site hooks; :mod:`fxpeft.methods.lora` calls them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from fxpeft.errors import (
    AdapterFileError,
    ConfigError,
    TargetError,
    UnsupportedSiteError,
)
from fxpeft.registry import Emit
from fxpeft.sites import Site, _owner
from fxpeft.tags import Role

if TYPE_CHECKING:
    from .lora import LoraAdapter, LoraConfig

__all__ = ["validate_parameter_config", "select_parameter_sites", "check_parameter_overlap", "refuse_parameter_sites", "check_parameter_site", "setup_parameter_adapter",
           "insert_parameter", "parameter_delta", "parameter_shapes", "parameter_tensors", "file_names",
           "parameter_config_fields"]

aten = torch.ops.aten


def validate_parameter_config(config: LoraConfig) -> None:
    """``target_parameters``: a list of names, and none of the features PEFT's ``ParamWrapper`` refuses."""
    targets = getattr(config, "target_parameters", None)
    if targets is None or targets == []:
        return
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not all(
            isinstance(t, str) and t for t in targets):
        raise ConfigError(f"target_parameters must be a list of parameter names (e.g. ['experts.gate_up_proj']), "
                          f"got {targets!r}")
    refused = [(f, v) for f, v in (("lora_dropout", config.lora_dropout), ("fan_in_fan_out", config.fan_in_fan_out),
                                   ("lora_bias", config.lora_bias), ("use_dora", config.use_dora)) if v]
    if refused:
        f, v = refused[0]
        raise ConfigError(f"{f}={v!r} does not work with target_parameters (as in PEFT: the update is added to the "
                          "parameter itself, with no input of its own to drop out, bias or rescale); unset it, or "
                          "adapt these weights through target_modules")
    init = config.init_lora_weights
    if init not in (True, False, "gaussian"):
        raise ConfigError(f"init_lora_weights={init!r} does not work with target_parameters; use True, False or "
                          "'gaussian'")


def _matches(target: str, path: str) -> bool:
    """PEFT's rule: the parameter's path equals the entry, or ends with ``.<entry>``."""
    return path == target or path.endswith(f".{target}")


def select_parameter_sites(config: LoraConfig, sites: dict[str, Site]) -> list[Site]:
    """The parameter sites ``config.target_parameters`` names; a name that matches no parameter the graph reads is
    a :class:`TargetError`."""
    targets = getattr(config, "target_parameters", None) or []
    params = [s for s in sites.values() if s.kind == "parameter"]
    missing = [t for t in targets if not any(_matches(t, s.weight) for s in params)]
    if missing:
        close = sorted({s.weight.rsplit(".", 2)[-2] + "." + s.weight.rsplit(".", 1)[-1] for s in params
                        if s.weight.count(".") and s.param_shape and len(s.param_shape) >= 2})[:8]
        raise TargetError(f"target_parameters entry {missing[0]!r} matches no parameter the graph reads; name a "
                          f"parameter by its path or a dotted suffix of it (e.g. {close})")
    return [s for s in params if any(_matches(t, s.weight) for t in targets)]


def check_parameter_overlap(modules: list[Site], params: list[Site]) -> None:
    """PEFT refuses a parameter of a module that ``target_modules`` adapts too (the two wrappers would nest)."""
    owners, weights = {s.name for s in modules}, {s.weight for s in modules}
    both = [s.weight for s in params if s.weight.rpartition(".")[0] in owners or s.weight in weights]
    if both:
        raise TargetError(f"target_parameters entry {both[0]!r} belongs to a module that target_modules adapts too "
                          "(PEFT refuses it); take the module out of target_modules (target_modules=[] for none: unset, "
                          "it is the model type's default) or the parameter out of target_parameters")


_MHA = "MultiheadAttention"
_MHA_PARTS = {".in_proj_weight": "in", ".out_proj.weight": "out", ".q_proj_weight": "q", ".k_proj_weight": "k",
              ".v_proj_weight": "v"}
_SEPARATE = ("q", "k", "v")


def _mha_parts(sites: dict[str, Site] | list[Site]) -> dict[str, dict[str, Site]]:
    """``{mha path: {"in": its in_proj_weight site, "out": its out_proj.weight site}}`` among parameter sites
    (``"q"``, ``"k"``, ``"v"`` instead of ``"in"``: an MHA with q/k/v weights of their own, ``kdim != embed_dim``)."""
    out: dict[str, dict[str, Site]] = {}
    for s in sites.values() if isinstance(sites, dict) else sites:
        if s.kind == "parameter" and s.module_type == _MHA:
            for leaf, part in _MHA_PARTS.items():
                if s.weight.endswith(leaf):
                    out.setdefault(s.weight[: -len(leaf)], {})[part] = s
    return out


def _mha_targets(config: LoraConfig, sites: dict[str, Site]) -> tuple[Any, list[Site]]:
    """Split a list ``target_modules``: the entries naming ``nn.MultiheadAttention`` modules (PEFT's rule: the path,
    or a dotted suffix of it) give those modules' parameter sites (in_proj and out_proj; q/k/v and out_proj for
    separate weights, which PEFT refuses: fxpeft adapts them but does not save them for PEFT); the rest go to the
    generic rules."""
    from fxpeft.targeting import matches

    targets = config.target_modules
    parts = _mha_parts(sites)
    if not parts or not targets:
        return targets, []
    if isinstance(targets, str):  # a full-match regex: the MHA paths it matches (the rest: generic rules)
        hit = {targets: [p for p in parts if matches(targets, p) or any(
            matches(targets, s.name) for s in parts[p].values())]}  # load_adapter's exact regex names the sites
    else:
        hit = {t: [p for p in parts if p == t or p.endswith(f".{t}")] for t in targets}
    chosen: list[Site] = []
    for paths in hit.values():
        for p in paths:
            keys = ("in", "out") if "in" in parts[p] else (*_SEPARATE, "out")
            if any(k not in parts[p] for k in keys):
                raise UnsupportedSiteError(f"nn.MultiheadAttention {p!r}: the graph does not read all of its weights "
                                           f"{keys} (found {sorted(parts[p])}); target its parameters one by one "
                                           "with target_parameters instead")
            chosen += [parts[p][k] for k in keys if parts[p][k] not in chosen]
    if isinstance(targets, str):
        return targets, chosen
    return [t for t in targets if not hit[t]], chosen


def select_sites(config: LoraConfig, sites: dict[str, Site], select) -> list[Site]:
    """LoRA's targets: ``target_modules`` by PEFT's rules (an ``nn.MultiheadAttention`` as a whole: in_proj and
    out_proj), plus the parameters ``target_parameters`` names. Parameter sites are never chosen by name otherwise."""
    rest, mha = _mha_targets(config, sites)
    params = select_parameter_sites(config, sites)
    if (params or mha) and not rest and not isinstance(rest, str):
        if rest is not None:  # [] (nothing else), or every entry named an MHA
            modules = []
        else:
            try:  # unset target_modules: the model type's default, where there is one (as in PEFT)
                modules = select(config)
            except TargetError:
                modules = []
    elif isinstance(rest, str) and mha:  # a regex may match only the MHA
        try:
            modules = select(config)
        except TargetError:
            modules = []
    else:
        modules = select(config if not mha else dataclasses.replace(config, target_modules=rest))
    modules = [s for s in modules if s.kind != "parameter"]
    if isinstance(rest, str):  # a regex matching an MHA and its inner calls: the MHA as a whole, as in PEFT
        modules = [s for s in modules if s.weight not in {m.weight for m in mha}]
    excl = getattr(config, "exclude_modules", None)
    if excl:
        from fxpeft.targeting import matches

        mha = [s for s in mha if not matches(excl, s.weight.rsplit(".", 2 if "out_proj" in s.weight else 1)[0],
                                             "exclude_modules")]
    check_parameter_overlap(modules, params + mha)
    chosen = modules + mha + [s for s in params if s not in mha]
    if not chosen:
        raise TargetError(f"target_modules {config.target_modules!r} names only parameters; LoRA adapts a "
                          "parameter (before all its uses) when it is listed in target_parameters")
    return chosen


def refuse_parameter_sites(sites: dict[str, Site], names: list[str], what: str) -> None:
    """Typed refusal of ``what`` on parameter sites (their A/B rows are ordered (expert, rank): padding or
    concatenating ranks would mix experts; PEFT refuses add_weighted_adapter on them too)."""
    hit = sorted({n for n in names if n in sites and sites[n].kind == "parameter"})
    if hit:
        raise UnsupportedSiteError(f"{what} is not supported for LoRA on parameters ({hit[:3]}): their factors hold "
                                   "one rank block per expert; load the adapter under another name instead "
                                   "(fxpeft.load_adapter), or merge it")


def check_parameter_site(site: Site) -> str | None:
    """Why a parameter site cannot take LoRA: only 2-D and 3-D parameters have PEFT's factors (and conv weights,
    through their ``[out, in·k]`` view)."""
    if len(site.param_shape) not in (2, 3) and not site.kernel_size:
        return (f"parameter {site.weight!r} has {len(site.param_shape)} dimension(s) {site.param_shape}; LoRA on a "
                "parameter needs a 2-D [out, in] or 3-D [experts, out, in] one (as in PEFT)")
    return None


def num_experts(site: Site) -> int:
    """``E``: the leading dim of a 3-D parameter, 1 for a matrix or a conv weight (seen as ``[out, in·k]``)."""
    return site.param_shape[0] if len(site.param_shape) == 3 and not site.kernel_size else 1


def _mha_out_proj_factor(site: Site, config: LoraConfig) -> float:
    """2 for the ``out_proj`` of an ``nn.MultiheadAttention`` targeted as a whole, else 1.

    PEFT 0.21's ``lora.MultiheadAttention.merge`` (which its forward runs on every call) adds ``out_proj``'s update to
    the weight and then calls ``out_proj.merge``, which adds it again: PEFT computes ``W_out + 2·s·B·A``. fxpeft
    computes the same, so that a file gives the same outputs in both."""
    from fxpeft.targeting import matches

    if not (site.kind == "parameter" and site.module_type == _MHA and site.weight.endswith(".out_proj.weight")):
        return 1.0
    path, t = site.weight[: -len(".out_proj.weight")], config.target_modules
    if _separate_qkv(site, path):  # no PEFT semantics to follow there: the plain scaling
        return 1.0
    hit = bool(t) and (matches(t, path) or isinstance(t, str) and matches(t, site.name))
    return 2.0 if hit else 1.0


def _separate_qkv(site: Site, mha: str) -> bool:
    """Whether the MHA at ``mha`` (in the graph reading ``site``) has q/k/v weights of its own."""
    gm = site.calls[0].node.graph.owning_module if site.calls else None
    try:
        return gm is not None and isinstance(gm.get_parameter(f"{mha}.q_proj_weight"), torch.nn.Parameter)
    except AttributeError:
        return False


def setup_parameter_adapter(adapter: LoraAdapter, site: Site, r: int, config: LoraConfig) -> None:
    """Make an adapter built with ``r·E`` rows (A ``[r·E, in]``, B ``[out, r·E]``) the rank-``r`` adapter of each
    expert: its rank and scaling are ``r``'s (PEFT's ``lora_alpha / r``; twice that on an MHA's out_proj, as PEFT
    applies it: :func:`_mha_out_proj_factor`)."""
    adapter.r = r
    adapter.num_experts = num_experts(site)
    adapter.scaling = adapter.lora_alpha / math.sqrt(r) if adapter.use_rslora else adapter.lora_alpha / r
    adapter.scaling *= _mha_out_proj_factor(site, config)
    with torch.no_grad():
        adapter.scale.fill_(adapter.scaling)
        adapter.mixed_scale.fill_(adapter.scaling)


def _delta(op, A, B, s, site: Site):
    """``s·ΔW`` in the parameter's layout, from ops ``op(aten_op, *args, label=)`` (graph nodes or eager)."""
    E = num_experts(site)
    Bs = op(aten.mul.Tensor, B, s, label="scaled_B")  # s on the small factor: [out, r·E]
    if len(site.param_shape) == 2:
        return op(aten.mm.default, Bs, A, label="delta_weight")  # [out, r] @ [r, in] -> [out, in]
    if site.kernel_size:  # a conv weight: [out, r] @ [r, in·k] -> [out, in·k] -> [out, in, *k]
        flat = op(aten.mm.default, Bs, A, label="delta_flat")
        return op(aten.view.default, flat, list(site.param_shape), label="delta_weight")
    A3 = op(aten.view.default, A, [E, -1, site.in_features], label="A_experts")  # [E, r, in]
    B3 = op(aten.view.default, Bs, [site.out_features, -1, E], label="B_experts")  # [out, r, E]
    B3 = op(aten.permute.default, B3, [2, 0, 1], label="B_per_expert")  # [E, out, r]
    delta = op(aten.bmm.default, B3, A3, label="delta_weight")  # [E, out, in]
    if site.fan_in_fan_out:  # stored [E, in, out]
        delta = op(aten.transpose.int, delta, 1, 2, label="delta_weight_t")
    return delta


def _eager(aten_op, *args, label: str | None = None):
    return aten_op(*args)


def parameter_delta(adapter: LoraAdapter, site: Site) -> torch.Tensor:
    """The fp32 update ``s·ΔW`` in the parameter's layout (the merge's fold, computed as the graph computes it)."""
    s = torch.tensor(adapter.scaling, dtype=torch.float32)
    return _delta(_eager, adapter.A.detach().float(), adapter.B.detach().float(), s, site)


def insert_parameter(emit: Emit, site: Site, adapter: LoraAdapter) -> None:
    """``W' = W + s·ΔW`` right after the parameter's read; every reader of ``W`` reads ``W'`` (0 while off)."""
    w = emit.call.node
    base_dtype = emit.gm.get_parameter(site.weight).dtype

    def op(aten_op, *args, label: str | None = None) -> fx.Node:
        return emit.op(aten_op, *args, role=Role.COMPUTE, label=label)

    A, B = emit.param("A", Role.DOWN_WEIGHT), emit.param("B", Role.UP_WEIGHT)
    delta = _delta(op, A, B, emit.param("scale", Role.SCALING), site)
    if adapter.A.dtype != base_dtype:  # PEFT casts ΔW to the parameter's dtype before the add
        delta = emit.cast(delta, base_dtype)
    emit.replace_output(emit.op(aten.add.Tensor, w, delta, role=Role.OUT, replaces=0, label="adapted"))


def parameter_shapes(config: LoraConfig, site: Site, r: int) -> dict[str, tuple[int, ...]]:
    """PEFT's ``lora_A.weight [r·E, in]`` and ``lora_B.weight [out, r·E]``."""
    e = num_experts(site)
    return {"lora_A.weight": (r * e, site.in_features), "lora_B.weight": (site.out_features, r * e)}


def parameter_tensors(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {"lora_A.weight": adapter.A.detach(), "lora_B.weight": adapter.B.detach()}


def _registration_rank(gm_owner: Any, leaf: str) -> int:
    names = list(getattr(gm_owner, "_parameters", {}))
    return names.index(leaf) if leaf in names else len(names)


def file_names(gm: fx.GraphModule, sites: list[Site]) -> dict[str, str]:
    """PEFT's nesting: the ``k`` targeted parameters of one module are wrapped in their registration order (the
    first innermost), so the ``i``-th sits under ``<module>`` + ``.base_layer`` × ``(k - 1 - i)``."""
    out = {s.name: s.name for s in sites if s.kind != "parameter"}
    by_module: dict[str, list[Site]] = {}
    for s in sites:
        if s.kind == "parameter":
            by_module.setdefault(s.weight.rpartition(".")[0], []).append(s)
    for module, group in list(by_module.items()):
        mha = module.endswith(".out_proj") or module == "out_proj"
        if mha and all(s.module_type == _MHA for s in group):  # PEFT's MHA wraps its out_proj inside: base_layer
            owner_path = module[: -len("out_proj")].rstrip(".")
            for s in group:
                out[s.name] = ".".join(p for p in (owner_path, "base_layer", "out_proj") if p)
            continue
        owner = gm.get_submodule(module) if module else gm
        group.sort(key=lambda s: _registration_rank(owner, s.weight.rpartition(".")[2]))
        for i, s in enumerate(group):
            out[s.name] = ".".join(p for p in (module, *(["base_layer"] * (len(group) - 1 - i))) if p)
    return out


def parameter_config_fields(fields: dict[str, Any], sites: dict[str, Site], adapted: list[str],
                            target_modules: Any) -> dict[str, Any]:
    """The config fields with the parameter sites moved from ``target_modules`` to ``target_parameters`` (their full
    paths, PEFT's exact names)."""
    _check_mha_save(fields, [sites[n] for n in adapted])
    conv = [sites[n].weight for n in adapted if sites[n].kind == "parameter" and sites[n].kernel_size]
    if conv:
        raise AdapterFileError(f"{conv[0]!r} is a conv weight adapted through its [out, in·k] view, which PEFT's "
                               "format cannot say (PEFT reads a 3-D parameter as [experts, in, out]); keep the "
                               "adapter in fxpeft (fxpeft.export, save_merged), or target the conv module itself")
    pairs = {p: v for p, v in _mha_parts([sites[n] for n in adapted]).items() if "in" in v and "out" in v}
    in_mha = {s.name for v in pairs.values() for s in (v["in"], v["out"])}
    params = sorted(sites[n].weight for n in adapted if sites[n].kind == "parameter" and n not in in_mha)
    if not params and not pairs:
        return fields
    modules = [n for n in adapted if sites[n].kind != "parameter"]
    from fxpeft.targeting import matches

    # [] rather than None: PEFT fills an unset target_modules with the model type's default modules
    kept = [k for k in (target_modules or []) if any(matches([k], n) for n in modules)] if modules else []
    if modules and isinstance(target_modules, str):
        raise UnsupportedSiteError("internal: a regex target_modules beside target_parameters; please report")
    kept = (kept or []) + sorted(pairs)
    return {**fields, "target_modules": kept, "target_parameters": params or None}


def _check_mha_save(fields: dict[str, Any], sites: list[Site]) -> None:
    """What PEFT's format cannot say about an ``nn.MultiheadAttention``: refused, so PEFT never loads it silently."""
    from .lora import pattern_value
    parts = _mha_parts(sites)
    for p, v in parts.items():
        if any(k in v for k in _SEPARATE):
            raise AdapterFileError(f"nn.MultiheadAttention {p!r} has separate q/k/v weights (kdim or vdim != "
                                   "embed_dim): fxpeft adapts them, but PEFT's format cannot say it (PEFT refuses such "
                                   "an MHA), so this adapter cannot be written for PEFT; keep it in fxpeft "
                                   "(fxpeft.export, save_merged)")
        if "out" in v and "in" not in v:
            raise AdapterFileError(f"{p}.out_proj.weight is adapted without its MHA's in_proj_weight: PEFT adapts an "
                                   "nn.MultiheadAttention only as a whole and never applies LoRA on its out_proj alone "
                                   "(nn.MultiheadAttention does not call it); this adapter cannot be written for PEFT")
        own = object()
        if "in" in v and "out" in v and any(pattern_value(fields.get(f) or {}, s.name, own, f) is not own
                                            for f in ("rank_pattern", "alpha_pattern") for s in (v["in"], v["out"])):
            raise AdapterFileError(f"nn.MultiheadAttention {p!r}: a rank/alpha of its own on in_proj or out_proj, which "
                                   "PEFT's format cannot say (one per MHA); use one rank for the module")
    for s in sites:
        if s.kind == "linear" and s.weight.endswith("out_proj.weight") and _owner_class(s) == _MHA:
            raise AdapterFileError(
                f"{s.name!r} is the out_proj of an nn.MultiheadAttention, adapted alone: fxpeft applies it, but PEFT "
                "never does (nn.MultiheadAttention does not call its out_proj), so PEFT would load this file silently "
                "with different outputs. Target the MHA module itself (PEFT's in_proj + out_proj), or keep the "
                "adapter in fxpeft (fxpeft.export, save_merged)")


def _owner_class(site: Site) -> str | None:
    """The class of the module whose code makes the site's first call."""
    owner = _owner(site.calls[0].node) if site.calls else None
    return owner[1] if owner else None
