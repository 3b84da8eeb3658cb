"""The inject pass: target sites, validate everything, then insert one method's adapter subgraphs.

Nothing in the graph or the module changes until every check has passed, and the mutation itself runs in a
:func:`~fxpeft.passes.transaction.transaction`, so a failed rewrite (even from a bug inside a method's
``insert``) leaves ``gm.code`` and ``gm.state_dict()`` exactly as they were.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpeft.copies import FullCopy, build_copies, insert_copies, plan_copies
from fxpeft.errors import AdapterExistsError, ConfigError, UnsupportedSiteError, WeightsError
from fxpeft.registry import AdapterModule, Emit, Method, PeftRegistry
from fxpeft.sites import CALL_KINDS, Site, find_sites
from fxpeft.tags import AdapterTag, PendingBuild, Role, get_tag, graph_info, set_graph_info
from fxpeft.targeting import select_sites

from .transaction import lint, transaction

__all__ = ["InjectAdapter", "build_adapters", "adapter_nodes", "adapter_modules", "ordered_names", "freeze_base", "check_adapter_name"]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def check_adapter_name(name: Any) -> str:
    """Adapter names are what PEFT accepts: letters, digits, ``_``, ``-``, ``.`` (``"svd-rank6"``)."""
    if not (isinstance(name, str) and _NAME.fullmatch(name) and len(name) <= 100):
        raise ConfigError(f"adapter_name {name!r} is not a valid adapter name; use letters, digits, '_', '-' "
                          "or '.', e.g. 'default'")
    return name


def adapter_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Each adapter module path -> its nodes (shared fused nodes are listed under their lead), in graph order."""
    found: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        tag = get_tag(n)
        if tag is not None:
            found.setdefault(tag.module, []).append(n)
    return found


def adapter_modules(gm: fx.GraphModule) -> dict[str, AdapterModule]:
    """Every adapter submodule of ``gm``, by path (found by type)."""
    return {name: m for name, m in gm.named_modules() if isinstance(m, AdapterModule)}


def ordered_names(mods) -> list[str]:
    """The adapter names of these adapter modules, in the order the adapters were added."""
    return [n for n, _ in sorted({m.adapter_name: getattr(m, "order", 0) for m in mods}.items(), key=lambda kv: kv[1])]


def freeze_base(gm: torch.nn.Module) -> None:
    """Make the parameters of active adapters trainable and every other parameter frozen. The first call
    records each base parameter's flag in the graph info, so removing the last adapter restores them."""
    adapters = [m for m in gm.modules() if isinstance(m, AdapterModule)]
    shared = set()
    for method, name in {(m.method, m.adapter_name) for m in adapters}:  # one look-up per adapter, not per site
        state = gm._modules.get(Method.shared_path(method, name))  # a top-level submodule
        if state is not None:
            shared.update(id(p) for p in state.parameters())
    trainable, adapter_ids = set(), set(shared)
    for m in adapters:  # one walk of each adapter's parameters gives both sets
        if type(m).trainable_parameters is not AdapterModule.trainable_parameters:  # a method's own rule
            adapter_ids.update(id(p) for p in m.parameters())
            trainable.update(id(p) for p in m.trainable_parameters() if m.enabled)
            continue
        for n, p in m.named_parameters():
            adapter_ids.add(id(p))
            if m.enabled and n not in m.frozen_params:
                trainable.add(id(p))
    params = list(gm.named_parameters())  # one walk of the whole tree
    info = graph_info(gm)
    if info.frozen is None:
        info.frozen = {n: p.requires_grad for n, p in params if id(p) not in adapter_ids}
        set_graph_info(gm, info)
    for _, p in params:
        if id(p) not in shared:  # shared state keeps the flags its method gave it (VeRA's frozen matrices)
            flag = id(p) in trainable
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def _adapter_path(mods: dict[str, torch.nn.Module], site: Site, method: str, adapter_name: str) -> str:
    """Adapters hang off the owning module: ``<site>.lora_default``; for a bare parameter ``<parent>.<param>_lora_default``.
    ``mods``: the graph module's submodules by path (one walk for all sites)."""
    leaf = f"{method}_{adapter_name}".replace(".", "_")
    if site.name in mods:
        return f"{site.name}.{leaf}"
    parent, _, attr = site.name.rpartition(".")
    return f"{parent}.{attr}_{leaf}" if parent else f"{attr}_{leaf}"


def _site_weights(gm: fx.GraphModule, chosen: list[Site], mods: dict[str, torch.nn.Module] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Each chosen site's base weight by path, each owner resolved from ``mods`` (one module walk) rather than
    from the root per site."""
    if mods is None:
        return {s.weight: gm.get_parameter(s.weight) for s in chosen}
    found = {}
    for s in chosen:
        parent, _, attr = s.weight.rpartition(".")
        owner = mods.get(parent)
        p = owner._parameters.get(attr) if owner is not None else None
        found[s.weight] = p if p is not None else gm.get_parameter(s.weight)  # the typed look-up's error, if any
    return found


def _check_free(gm: fx.GraphModule, method: type[Method], name: str, chosen: list[Site],
                paths: dict[str, str], mods: dict[str, torch.nn.Module], present: list[AdapterModule]) -> None:
    """Refuse a second adapter of one name at a site, mixed methods at one site, and taken attribute names.
    ``mods``/``present``: the submodules by path and the adapters among them (one walk)."""
    existing = {}
    for m in present:
        existing.setdefault(m.site_name, []).append(m)
    for s in chosen:
        for m in existing.get(s.name, ()):
            if isinstance(m, FullCopy):  # another adapter's trained copy of this module's bias: no conflict
                continue
            if m.adapter_name == name:
                raise AdapterExistsError(
                    f"site {s.name!r} already holds adapter {name!r} ({m.method}); pass another adapter_name, or "
                    "merge/remove the existing one first")
            if m.method != method.name:
                raise AdapterExistsError(
                    f"site {s.name!r} already holds a {m.method} adapter; mixing {m.method} and {method.name} on one "
                    "site is not supported (their composition order would be ambiguous)")
        parent, _, leaf = paths[s.name].rpartition(".")
        owner = mods.get(parent) if parent else gm
        if owner is None:
            owner = gm.get_submodule(parent)
        if hasattr(owner, leaf):
            raise AdapterExistsError(f"attribute {paths[s.name]!r} already exists; pick another adapter_name")


def build_adapters(gm: fx.GraphModule, method: type[Method], config: Any, name: str, chosen: list[Site],
                   weights: dict[str, torch.Tensor] | None = None
                   ) -> tuple[dict[str, AdapterModule], torch.nn.Module | None, dict[str, torch.Tensor]]:
    """Build one adapter's modules (per site, then the state its sites share) and the base updates its init asks
    for (PiSSA's residual); nothing is attached. The one place adapters are initialised: the inject pass and
    :func:`fxpeft.load_weights` (replaying a rewrite done on meta weights) both call it, so the random draws come
    in the same order and a replay under the same RNG state gives the same values."""
    weights = weights if weights is not None else _site_weights(gm, chosen)  # ``weights``: the sites' base weights
    adapters = {s.name: method.build(s, config, name, weights[s.weight]) for s in chosen}
    first = weights[chosen[0].weight]
    shared = method.shared_state(config, chosen, name, first.dtype, first.device)
    # inits that leave the base a residual (PiSSA): computed in build, written inside the transaction
    updates = {s.weight: u for s in chosen if (u := method.base_update(adapters[s.name], s)) is not None}
    return adapters, shared, updates


def _rng_bytes() -> bytes:
    return torch.random.get_rng_state().numpy().tobytes()


def _pending_build(method: type[Method], config: Any, name: str, chosen: list[Site],
                   paths: dict[str, str], weights: dict[str, torch.Tensor]) -> PendingBuild | None:
    """The record of a build on meta base weights (None on real ones): load_weights replays it once they load."""
    meta = [s.name for s in chosen if weights[s.weight].is_meta]
    if not meta:
        return None
    if len(meta) != len(chosen):
        raise WeightsError(f"{len(meta)} of the {len(chosen)} targeted sites have their weights on the meta device "
                           f"(first: {meta[0]!r}) and the others are loaded; load every base weight "
                           "(fxpeft.load_weights) or none before the rewrite")
    return PendingBuild(method.name, name, copy.deepcopy(config), tuple((s.name, paths[s.name]) for s in chosen),
                        _rng_bytes(), b"")


@dataclass(frozen=True)
class InjectAdapter:
    """Insert one adapter (of the method ``config`` belongs to) at every targeted site.

    Args:
        config: a registered method config (:class:`fxpeft.LoraConfig`, :class:`fxpeft.IA3Config`, ...).
        adapter_name: key of this adapter; one site can hold several adapters under different names.
        recompile: False when a later pass in the same pipeline lints the graph and regenerates the code anyway.

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes import InjectAdapter
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> InjectAdapter(fxpeft.LoraConfig(r=2, target_modules=["0"]))(gm).modified
        True
    """

    config: Any
    adapter_name: str = "default"
    recompile: bool = True

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        if not isinstance(gm, fx.GraphModule):
            raise ConfigError(f"rewrite takes the graph of a model (a torch.fx.GraphModule), got {type(gm).__name__}; "
                              "capture the model first: gm = fxpeft.trace(model, args, kwargs)")
        method = PeftRegistry.for_config(self.config)
        name = check_adapter_name(self.adapter_name)
        info = graph_info(gm)
        # defaults filled in must not leak into the caller's object
        config = method.fill_defaults(copy.copy(self.config), info.model_type)
        method.validate_config(config)
        sites = find_sites(gm, CALL_KINDS | method.site_kinds)
        chosen = select_sites(gm, config, method, sites)
        bad = [(s.name, why) for s in chosen if (why := method.check_site(s, config))]
        if bad:
            lines = "; ".join(f"{n}: {w}" for n, w in bad[:5])
            raise UnsupportedSiteError(f"{len(bad)} targeted site(s) cannot take {method.display_name}: {lines}. "
                                       "Narrow target_modules or add these to exclude_modules.")
        mods = dict(gm.named_modules(remove_duplicate=False))  # the one walk of the module tree before the mutation
        present = list({id(m): m for m in mods.values() if isinstance(m, AdapterModule)}.values())
        paths = {s.name: _adapter_path(mods, s, method.name, name) for s in chosen}
        _check_free(gm, method, name, chosen, paths, mods, present)
        method.check_selection(config, chosen)
        # modules_to_save / trained biases: per-adapter copies of base tensors (fxpeft.copies), checked here too
        copies = build_copies(plan_copies(gm, config, name, chosen), name)
        weights = _site_weights(gm, chosen, mods)
        pending = _pending_build(method, config, name, chosen, paths, weights)
        try:
            adapters, shared, updates = build_adapters(gm, method, config, name, chosen, weights)
        except NotImplementedError as e:  # an init that reads the weight's values (a check): meta has none
            if pending is None:
                raise
            raise WeightsError(f"{method.display_name}'s initialisation reads the base weights' values, which are on "
                               f"the meta device ({e}); load them first: fxpeft.rewrite(fxpeft.load_weights(gm, "
                               "directory), config)") from None
        if pending is not None:
            pending = replace(pending, rng_after=_rng_bytes())
        order = {m.adapter_name: getattr(m, "order", 0) for m in present}
        for m in [*adapters.values(), *copies.values()]:  # PEFT lists adapters in the order they were added
            m.order = order.get(name, max(order.values(), default=0) + 1)
        if any(m.adapter_name != name for m in present):
            for m in [*adapters.values(), *copies.values()]:  # PEFT's add_adapter: added, not made active
                m.set_active(False)

        with transaction(gm) as txn:  # ---- validated: mutate from here on, all or nothing ----
            for weight, value in updates.items():
                txn.replace_data(gm.get_parameter(weight), value)
            if shared is not None:
                gm.add_submodule(Method.shared_path(method.name, name), shared)
            for s in chosen:
                gm.add_submodule(paths[s.name], adapters[s.name])
                for call in s.calls:
                    tag = AdapterTag(method.name, name, s.name, paths[s.name], Role.COMPUTE)
                    emit = Emit(gm, tag, call, s, info.dialect == "export")
                    with gm.graph.inserting_before(call.node.next):
                        method.insert(emit, s, adapters[s.name])
            insert_copies(gm, copies)
            freeze_base(gm)
            if pending is not None:  # fxpeft.load_weights gives these adapters their values once the base is in
                now = graph_info(gm)  # freeze_base may have stored a new record
                now.pending_builds = (*now.pending_builds, pending)
                set_graph_info(gm, now)
            if self.recompile:
                lint(gm)
                gm.recompile()
        return PassResult(gm, True)
