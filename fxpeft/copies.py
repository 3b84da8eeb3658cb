"""Full copies: base tensors an adapter trains whole, as its own copy (PEFT's ``modules_to_save`` and trained biases).

PEFT's tuners share three config fields that train base tensors outright, for every method:

* ``modules_to_save`` (and the ``classifier``/``score``/``qa_outputs`` a ``task_type`` adds): every parameter and
  persistent buffer of each matching module gets a trainable per-adapter copy (``ModulesToSaveWrapper``);
* ``bias="all"``: every base bias (a parameter named ``bias``) is trained;
* ``bias="<method>_only"`` (``"lora_only"``): the biases of the adapted sites are trained.

fxpeft gives each of them a per-adapter copy, a :class:`FullCopy` (an :class:`~fxpeft.AdapterModule`, so the
lifecycle functions treat it like any adapter), and rewrites every read of the base tensor into
``where(gate, copy, base)``: the copy while the adapter is on, the base tensor while it is off or merged. So
``set_adapter`` / ``disable_adapters`` switch copies with no new code, exactly as they switch a LoRA adapter;
``merge`` writes the copy into the base tensor; ``merge_adapter`` does too and keeps the base values for
``unmerge_adapter``; ``delete_adapter`` / ``unload`` leave the base graph. PEFT trains the base biases themselves
(shared by every adapter); a per-adapter copy keeps fxpeft's contract that switching adapters off gives the base
outputs exactly, and gives the same outputs while the adapter is on.

Nodes are tagged with :class:`~fxpeft.tags.AdapterTag` (method ``"copy"``): the ``where`` is ``Role.OUT`` and
``replaces`` the base read (``args[2]``), so removal is the generic one.

PEFT's file keys (``base_model.model.`` + ...): ``<module>.<param>`` for a module saved whole, ``<site>.base_layer.bias``
for the bias of a module the adapter targets, ``<module>.bias`` for any other bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import AdapterExistsError, AdapterFileError, ConfigError, MergeError, TargetError, UnsupportedSiteError
from .registry import AdapterModule
from .sites import Site
from .tags import AdapterTag, Role, get_tag, graph_info, set_tag
from .targeting import TASK_MODULES, saved_names

__all__ = ["FullCopy", "CopyPlan", "plan_copies", "saved_modules", "take_copy_tensors", "build_copies", "insert_copies", "full_copies", "site_adapters",
           "copy_tensors", "copy_shapes", "load_copy_tensors", "copy_config_fields", "check_active", "write_copies",
           "fold_copy", "unfold_copy", "METHOD"]

#: the ``AdapterTag.method`` / ``AdapterModule.method`` of full copies (not a registered PEFT method)
METHOD = "copy"
aten = torch.ops.aten


class FullCopy(AdapterModule):
    """One adapter's trainable copy of some base tensors of one module.

    Attributes:
        owner: the module whose tensors are copied (``site_name`` too).
        kind: ``"module"`` (``modules_to_save``: the whole module) or ``"bias"`` (a trained bias).
        mode: for ``"bias"``: the config's ``bias`` value (``"all"`` or ``"lora_only"``).
        bases: relative name -> the base tensor's path in the graph module.
        keys: relative name -> PEFT's file key (without the ``base_model.model.`` prefix).
        values: a module tree holding the copies under their relative names (parameters stay parameters).
    """

    method = METHOD

    def __init__(self, owner: str, adapter_name: str, kind: str, mode: str | None, tensors: dict[str, torch.Tensor],
                 bases: dict[str, str], keys: dict[str, str]) -> None:
        super().__init__(owner, adapter_name)
        self.owner, self.kind, self.mode = owner, kind, mode
        self.bases, self.keys = dict(bases), dict(keys)
        self.stash: dict[str, torch.Tensor] = {}  # base values while merged (merge_adapter), for unmerge
        self.values = nn.Module()
        for rel, t in tensors.items():
            parent, _, leaf = rel.rpartition(".")
            holder = self.values
            for part in parent.split(".") if parent else ():
                if part not in holder._modules:
                    holder.add_module(part, nn.Module())
                holder = holder._modules[part]
            data = t.detach().clone()
            if isinstance(t, nn.Parameter):
                holder.register_parameter(leaf, nn.Parameter(data, requires_grad=True))
            else:
                holder.register_buffer(leaf, data)

    def value(self, rel: str) -> torch.Tensor:
        obj = self.values
        for part in rel.split("."):
            obj = getattr(obj, part)
        return obj

    def extra_repr(self) -> str:
        return f"owner={self.owner!r}, adapter={self.adapter_name!r}, kind={self.kind!r}, tensors={list(self.bases)}"


@dataclass
class CopyPlan:
    """What one :class:`FullCopy` will hold (checked, nothing changed yet)."""

    owner: str
    kind: str
    mode: str | None
    path: str  # where the FullCopy goes
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # rel -> base tensor
    bases: dict[str, str] = field(default_factory=dict)  # rel -> base path
    keys: dict[str, str] = field(default_factory=dict)  # rel -> file key


def full_copies(gm: nn.Module) -> dict[str, FullCopy]:
    """Every full copy in ``gm``, by path."""
    return {p: m for p, m in gm.named_modules() if isinstance(m, FullCopy)}


def site_adapters(mods: dict[str, AdapterModule]) -> dict[str, AdapterModule]:
    """The adapters among ``mods`` that sit on a site (every adapter module but the full copies)."""
    return {p: m for p, m in mods.items() if not isinstance(m, FullCopy)}


# ------------------------------------------------------------------------------------------------------ planning


def _adapter_roots(gm: nn.Module) -> list[str]:
    return [p for p, m in gm.named_modules() if isinstance(m, AdapterModule)]


def _inside(path: str, roots) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _module_paths(gm: fx.GraphModule) -> list[str]:
    """Every base module path: the module tree (adapters left out) and the graph's module stacks (modules
    without state of their own, which ``torch.export`` does not keep as submodules)."""
    roots = _adapter_roots(gm)
    names = {p for p, _ in gm.named_modules() if p and not _inside(p, roots)}
    for n in gm.graph.nodes:
        for path, _ in (n.meta.get("nn_module_stack") or {}).values():
            if path:
                names.add(path)
    return sorted(names)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and persistent buffers by relative name, adapters left out (PEFT's copy's state_dict)."""
    out: dict[str, torch.Tensor] = {}

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, p in mod._parameters.items():
            if p is not None:
                out[prefix + name] = p
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                out[prefix + name] = b
        for name, child in mod._modules.items():
            if child is not None and not isinstance(child, AdapterModule):
                walk(child, f"{prefix}{name}.")

    walk(module, "")
    return out


def _get(gm: nn.Module, path: str):
    obj = gm
    for part in path.split(".") if path else ():
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _leaf(adapter_name: str) -> str:
    return f"copy_{adapter_name}".replace(".", "_").replace("-", "_")


def _copy_path(owner: str, adapter_name: str) -> str:
    return f"{owner}.{_leaf(adapter_name)}" if owner else _leaf(adapter_name)


def saved_modules(gm: fx.GraphModule, names: list[str]) -> tuple[list[str], list[str]]:
    """PEFT's ``_set_trainable`` match (a module path ending with a listed name): ``(every match, the matches
    with state to copy)``."""
    matched = [p for p in _module_paths(gm) if any(p.endswith(t) for t in names)]
    return matched, [p for p in matched if isinstance(_get(gm, p), nn.Module) and _state(_get(gm, p))]


def plan_copies(gm: fx.GraphModule, config: Any, adapter_name: str, chosen: list[Site], *,
                check_free: bool = True) -> list[CopyPlan]:
    """The full copies ``config`` asks for (``modules_to_save``, ``task_type``, ``bias``), checked against the graph.

    Raises:
        TargetError: no listed ``modules_to_save`` module exists, or one is also a target of the adapter.
        UnsupportedSiteError: a copied tensor is tied to another module, read by an opaque ``call_module``, or a
            saved module holds (or sits inside a module that another adapter saves with) adapters.
        ConfigError: an unknown ``bias`` value.
        AdapterExistsError: the copy's attribute name is taken.
    """
    plans: list[CopyPlan] = []
    adapters = {p: m for p, m in gm.named_modules() if isinstance(m, AdapterModule)}  # one walk of the modules
    roots = list(adapters)
    existing = {p: m for p, m in adapters.items() if isinstance(m, FullCopy)}
    others_saved = {m.owner: m.adapter_name for m in existing.values() if m.kind == "module"}
    saved = saved_names(config)
    owners: list[str] = []
    if saved:
        matched, owners = saved_modules(gm, saved)
        if not matched:
            leaves = sorted({p.rsplit(".", 1)[-1] for p in _module_paths(gm)})
            task = getattr(config, "task_type", None)
            why = f" (task_type={task!r} adds {list(TASK_MODULES[task])})" if task in TASK_MODULES else ""
            raise TargetError(f"modules_to_save {saved}{why} matches no module of this graph; module names end in "
                              f"{leaves[:12]}{' ...' if len(leaves) > 12 else ''}")
        for p in matched:
            outer = next((q for q in matched if p.startswith(q + ".")), None)
            if outer is not None:
                raise ConfigError(f"modules_to_save matches both {outer!r} and {p!r}, which lies inside it; name only "
                                  "the outer module")
        for p in owners:
            hit = next((s.name for s in chosen if _inside(s.name, [p])), None)
            if hit is not None:
                raise TargetError(f"{hit!r} is both a target and (inside) modules_to_save module {p!r}; PEFT refuses "
                                  "to adapt a module it saves whole. Narrow target_modules or modules_to_save")
            held = [r for r in roots if r.startswith(p + ".") and not (
                isinstance(existing.get(r), FullCopy) and existing[r].owner == p)]
            if held:
                raise UnsupportedSiteError(f"modules_to_save module {p!r} holds adapters ({held[:2]}); a module saved "
                                           "whole cannot hold adapters of other adapter names. Delete them first")
            outer = next((q for q in others_saved if q != p and _inside(p, [q])), None)
            if outer is not None:
                raise UnsupportedSiteError(f"modules_to_save module {p!r} lies inside {outer!r}, which adapter "
                                           f"{others_saved[outer]!r} saves whole; save the same module, or none")
            state = _state(_get(gm, p))
            plans.append(CopyPlan(p, "module", None, _copy_path(p, adapter_name), dict(state),
                                  {rel: f"{p}.{rel}" for rel in state}, {rel: f"{p}.{rel}" for rel in state}))
    for s in chosen:  # this adapter's sites must not lie inside a module another adapter saves whole
        outer = next((q for q in others_saved if _inside(s.name, [q])), None)
        if outer is not None:
            raise UnsupportedSiteError(f"site {s.name!r} lies inside {outer!r}, which adapter {others_saved[outer]!r} "
                                       "saves whole (modules_to_save); a module saved whole cannot also be adapted")

    bias = getattr(config, "bias", "none")
    if bias not in (None, "none"):
        if not isinstance(bias, str) or not (bias == "all" or bias.endswith("_only")):
            raise ConfigError(f"bias={bias!r} is not supported; use 'none', 'all' or '<method>_only' (e.g. 'lora_only')")
        targeted = {s.name for s in chosen}
        if bias == "all":  # PEFT: every parameter named "bias"
            paths = [n for n, _ in gm.named_parameters() if (n == "bias" or n.endswith(".bias")) and not _inside(n, roots)]
        else:  # the adapted sites' own biases
            paths = [s.bias for s in chosen if s.bias is not None]
        for path in dict.fromkeys(paths):
            if _inside(path, owners):
                continue  # its module is saved whole already
            owner, _, leaf = path.rpartition(".")
            key = f"{owner}.base_layer.{leaf}" if owner in targeted and leaf == "bias" else path
            plans.append(CopyPlan(owner, "bias", bias, _copy_path(owner, adapter_name), {leaf: gm.get_parameter(path)},
                                  {leaf: path}, {leaf: key}))
    by_path: dict[str, CopyPlan] = {}
    for plan in plans:  # one FullCopy per owner module
        if plan.path in by_path:
            have = by_path[plan.path]
            have.tensors.update(plan.tensors), have.bases.update(plan.bases), have.keys.update(plan.keys)
        else:
            by_path[plan.path] = plan
    plans = list(by_path.values())
    _check_tensors(gm, plans)
    for plan in plans if check_free else ():
        parent, _, leaf = plan.path.rpartition(".")
        holder = _get(gm, parent)
        if holder is None or hasattr(holder, leaf):
            raise AdapterExistsError(f"attribute {plan.path!r} already exists; pick another adapter_name")
    return plans


def _check_tensors(gm: fx.GraphModule, plans: list[CopyPlan]) -> None:
    """Every copied tensor is the graph's only reference to it under its module, and read through ``get_attr``."""
    if not plans:
        return
    aliases: dict[int, list[str]] = {}
    for n, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(t), []).append(n)
    opaque = {n.target: {id(t) for t in [*_get(gm, n.target).parameters(), *_get(gm, n.target).buffers()]}
              for n in gm.graph.nodes if n.op == "call_module" and isinstance(_get(gm, n.target), nn.Module)}
    for plan in plans:
        for rel, t in plan.tensors.items():
            scope = plan.owner if plan.kind == "module" else plan.bases[rel]
            tied = [a for a in aliases.get(id(t), ()) if not _inside(a, [scope])]
            if tied:
                raise UnsupportedSiteError(f"{plan.bases[rel]!r} is tied to {tied[0]!r}; a copy of a tied tensor "
                                           "would untie it. Save or train the tensor through one module only")
            caller = next((c for c, ids in opaque.items() if id(t) in ids), None)
            if caller is not None:
                raise UnsupportedSiteError(
                    f"{plan.bases[rel]!r} is used inside {caller!r}, which this graph calls as one opaque module, so "
                    "a copy cannot stand in for it; trace with example inputs (fxpeft.trace(model, args, kwargs)), "
                    "where every parameter is a graph value")


# -------------------------------------------------------------------------------------------------------- graph


def build_copies(plans: list[CopyPlan], adapter_name: str) -> dict[str, FullCopy]:
    """The :class:`FullCopy` modules of checked plans (no graph change), by path."""
    return {p.path: FullCopy(p.owner, adapter_name, p.kind, p.mode, p.tensors, p.bases, p.keys) for p in plans}


def insert_copies(gm: fx.GraphModule, copies: dict[str, FullCopy]) -> None:
    """Attach the copies and make every base read of a copied tensor read ``where(gate, copy, base)``.

    Raises:
        UnsupportedSiteError: an adapter reads a copied base tensor itself (DoRA reads its site's bias: a copy of the
            bias cannot stand in for that read), whichever of the two came first.
    """
    every = {**full_copies(gm), **copies}
    if not every:
        return
    export = graph_info(gm).dialect == "export"
    where = aten.where.self if export else torch.where
    for path, m in copies.items():
        gm.add_submodule(path, m)
    reads: dict[int, list[fx.Node]] = {}
    own_reads: dict[int, fx.Node] = {}  # an adapter's own read of a base tensor (Role.BASE_BIAS, ...)
    for n in gm.graph.nodes:
        if n.op == "get_attr" and isinstance(t := _get(gm, n.target), torch.Tensor):
            if get_tag(n) is None:
                reads.setdefault(id(t), []).append(n)
            elif get_tag(n).method != METHOD:
                own_reads.setdefault(id(t), n)
    for path, m in every.items():
        for base_path in m.bases.values():
            reader = own_reads.get(id(_get(gm, base_path)))
            if reader is not None:
                tag = get_tag(reader)
                raise UnsupportedSiteError(
                    f"the {tag.method} adapter {tag.adapter!r} at {tag.site!r} reads {base_path!r} itself, and adapter "
                    f"{m.adapter_name!r} trains a copy of it ({'bias=' + repr(m.mode) if m.kind == 'bias' else 'modules_to_save'}), "
                    "which cannot stand in for that read. Train the bias in one of them only (bias='none' in the other)")
    for path, m in copies.items():
        for rel, base_path in m.bases.items():
            for n in reads.get(id(_get(gm, base_path)), ()):
                tag = AdapterTag(METHOD, m.adapter_name, m.owner, path, Role.PARAM)
                stem = f"{base_path}_{m.adapter_name}".replace(".", "_").replace("-", "_")
                with gm.graph.inserting_before(n.next):
                    copy = gm.graph.create_node("get_attr", f"{path}.values.{rel}", name=f"{stem}_copy")
                    gate = gm.graph.create_node("get_attr", f"{path}.gate", name=f"{stem}_gate")
                    out = gm.graph.create_node("call_function", where, (gate, copy, n), name=f"{stem}_out")
                for node, role in ((copy, Role.PARAM), (gate, Role.PARAM), (out, Role.OUT)):
                    set_tag(node, tag.with_role(role, replaces=2 if role is Role.OUT else None))
                n.replace_all_uses_with(out, delete_user_cb=lambda u, out=out: u is not out)


# ------------------------------------------------------------------------------------------------ merge / fold


def _finite(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def _check_merge(gm: fx.GraphModule, copies: list[FullCopy]) -> None:
    seen: dict[str, str] = {}
    for m in copies:
        for rel, base in m.bases.items():
            if base in seen and seen[base] != m.adapter_name:
                raise MergeError(f"adapters {seen[base]!r} and {m.adapter_name!r} both hold a copy of {base!r}; "
                                 "merge one of them")
            seen[base] = m.adapter_name
            if not _finite(m.value(rel)):
                raise MergeError(f"the copy of {base!r} in adapter {m.adapter_name!r} holds NaN/inf; nothing was merged")


def write_copies(gm: fx.GraphModule, copies: list[FullCopy], txn) -> None:
    """``merge``: each base tensor takes its copy's values (old data kept by the transaction)."""
    _check_merge(gm, copies)
    with torch.no_grad():
        for m in copies:
            for rel, base in m.bases.items():
                t = _get(gm, base)
                txn.replace_data(t, m.value(rel).detach().to(t.dtype).clone())


def fold_copy(gm: fx.GraphModule, m: FullCopy, txn) -> None:
    """``merge_adapter``: the base tensors take the copy's values; their old values are kept for unmerge."""
    _check_merge(gm, [m])
    for other in full_copies(gm).values():
        shared = sorted(set(other.bases.values()) & set(m.bases.values()))
        if other is not m and other.merged and shared:
            raise MergeError(f"adapter {other.adapter_name!r} has its copy of {shared[0]!r} merged already; unmerge it "
                             f"before merging {m.adapter_name!r}'s copy")
    stash = {}
    with torch.no_grad():
        for rel, base in m.bases.items():
            t = _get(gm, base)
            stash[rel] = t.detach().clone()
            txn.will_write(t)
            t.copy_(m.value(rel))
    txn.on_rollback(lambda m=m, old=m.stash: setattr(m, "stash", old))
    m.stash = stash


def unfold_copy(gm: fx.GraphModule, m: FullCopy, txn) -> None:
    """``unmerge_adapter``: the base tensors get back the values they had before :func:`fold_copy`."""
    with torch.no_grad():
        for rel, base in m.bases.items():
            t = _get(gm, base)
            txn.will_write(t)
            t.copy_(m.stash[rel])
    txn.on_rollback(lambda m=m, old=m.stash: setattr(m, "stash", old))
    m.stash = {}


def check_active(gm: fx.GraphModule, names: tuple[str, ...]) -> None:
    """PEFT lets one adapter at a time use a module saved whole: refuse two active adapters that save one module."""
    owners: dict[str, str] = {}
    for m in full_copies(gm).values():
        if m.kind == "module" and m.adapter_name in names:
            if m.owner in owners and owners[m.owner] != m.adapter_name:
                raise ConfigError(f"adapters {owners[m.owner]!r} and {m.adapter_name!r} both save {m.owner!r} "
                                  "(modules_to_save); only one of them can be active at a time, as in PEFT")
            owners[m.owner] = m.adapter_name


# ---------------------------------------------------------------------------------------------------- files


def copy_shapes(plans: list[CopyPlan]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """File key (without prefix) -> (shape, dtype) of every copied tensor the plans expect."""
    return {p.keys[rel]: (tuple(t.shape), t.dtype) for p in plans for rel, t in p.tensors.items()}


def copy_tensors(copies: dict[str, FullCopy]) -> dict[str, torch.Tensor]:
    """Every copy's tensors under PEFT's file keys (without prefix)."""
    return {m.keys[rel]: m.value(rel).detach() for m in copies.values() for rel in m.bases}


def load_copy_tensors(copies: dict[str, FullCopy], tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked file tensors (keys and shapes of :func:`copy_shapes`) into the copies."""
    with torch.no_grad():
        for m in copies.values():
            for rel in m.bases:
                m.value(rel).copy_(tensors[m.keys[rel]])


def take_copy_tensors(tensors: dict[str, torch.Tensor], plans: list[CopyPlan], prefix: str) -> dict[str, torch.Tensor]:
    """Take the copied tensors out of a file's (every key there, every shape right), by key without prefix.

    Raises:
        AdapterFileError: a key is missing or a shape differs.
    """
    want = copy_shapes(plans)
    missing = [prefix + k for k in want if prefix + k not in tensors]
    wrong = [f"{prefix + k}: file {tuple(tensors[prefix + k].shape)}, graph expects {s}" for k, (s, _) in want.items()
             if prefix + k in tensors and tuple(tensors[prefix + k].shape) != s]
    if missing or wrong:
        what = "; ".join(f"{len(v)} {w}: {', '.join(v[:5])}" for w, v in (("missing key(s)", missing),
                                                                           ("shape mismatch(es)", wrong)) if v)
        raise AdapterFileError(f"the adapter file's modules_to_save/bias tensors do not fit this graph: {what}. "
                               "Nothing was changed")
    taken = {k: tensors.pop(prefix + k) for k in want}
    for plan in plans:  # PEFT's bias="all" also saves the wrapper's insides, ``<module>.original_module.bias``
        for rel, base in plan.bases.items() if plan.kind == "module" else ():
            tensors.pop(f"{prefix}{plan.owner}.modules_to_save.{rel}", None)  # PEFT cannot load this one either
            original = tensors.pop(f"{prefix}{plan.owner}.original_module.{rel}", None)
            if original is not None:  # PEFT loads it into the base module: so do we (as a base weight)
                tensors[prefix + base] = original
    return taken


def copy_config_fields(copies: dict[str, FullCopy]) -> dict[str, Any]:
    """``adapter_config.json`` fields for these copies: ``modules_to_save`` (full module paths) and ``bias``."""
    fields: dict[str, Any] = {}
    saved = sorted({m.owner for m in copies.values() if m.kind == "module"})
    if saved:
        fields["modules_to_save"] = saved
    modes = {m.mode for m in copies.values() if m.kind == "bias"}
    if len(modes) > 1:
        raise AdapterFileError(f"the adapter's bias copies disagree on bias ({sorted(modes)}); one PEFT config has one")
    if modes:
        fields["bias"] = modes.pop()
    return fields
