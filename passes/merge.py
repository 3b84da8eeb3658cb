"""The merge pass: fold every adapter into its base weight and remove its nodes and modules.

Checks run on every site before any weight is written: each merged weight is computed in fp32 and must
be finite. Only then does each merged parameter get its merged data (cast back to its dtype), one site at a
time. The pass is atomic: the old data of every merged parameter is kept (by reference, no copy is made)
until the pass ends, so a failure half-way puts it all back. Peak extra memory is therefore the size of the
*merged* weights (not the whole model), plus one weight in fp32.

A weight shared with another call site (tied embedding / lm_head) is never changed under the other site:
the merged site gets its own copy, with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from fxpeft.copies import FullCopy, site_adapters, write_copies
from fxpeft.errors import MergeError
from fxpeft.registry import AdapterModule, PeftRegistry
from fxpeft.serialize import defer_codegen
from fxpeft.sites import SITE_KINDS, Site, _attr, find_sites
from fxpeft.tags import TAG_KEY, Role, get_tag, graph_info

from .inject import adapter_modules
from .remove import detach_adapters, restore_base_flags, select_adapters
from .transaction import Transaction, lint, transaction

__all__ = ["MergeAdapters"]


def _set_param(gm: fx.GraphModule, path: str, value: nn.Parameter) -> None:
    parent, _, leaf = path.rpartition(".")
    if parent:
        try:
            gm.get_submodule(parent)
        except AttributeError:
            gm.add_submodule(parent, nn.Module())
    owner = gm.get_submodule(parent) if parent else gm
    if leaf in owner._parameters or not hasattr(owner, leaf):
        owner.register_parameter(leaf, value)
    else:
        raise MergeError(f"cannot place an untied copy of a merged weight at {path!r}: the name is taken")


def _readers_index(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """For each parameter (by identity), the nodes that read it: users of its ``get_attr`` nodes (through
    any alias), and ``call_module`` nodes of modules owning it. Built once per merge: O(nodes)."""
    index: dict[int, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and get_tag(n) is None:
            index.setdefault(id(_attr(gm, n.target)), []).extend(n.users)
        elif n.op == "call_module":
            w = getattr(_attr(gm, n.target), "weight", None)
            if w is not None:
                index.setdefault(id(w), []).append(n)
    return index


def _fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """``t`` (fp32) is finite and representable in ``dtype``. One reduction instead of an elementwise mask:
    a NaN or inf anywhere makes the sum non-finite (the sum of finite weights cannot reach fp32's max)."""
    if not torch.isfinite(t.sum()):
        return False
    return dtype == torch.float32 or not dtype.is_floating_point or t.abs().max() <= torch.finfo(dtype).max


def refuse_foreign_reads(gm: fx.GraphModule, sites: dict[str, Site], folding: dict[str, AdapterModule]) -> None:
    """Refuse to fold ``folding`` (adapters by path) into a weight that an adapter of *another* site reads as a
    value and keeps reading (one this fold leaves in the graph): the fold would change what that adapter computes,
    so the merged graph would not give the unmerged outputs. (Adaption prompt runs its prompt through the layer's
    K/V weights: a LoRA there, once merged, would change the prompt's keys too.)

    Raises:
        MergeError: naming the weight, the reading adapter and the ways out; nothing is written.
    """
    by_site: dict[str, list[str]] = {}  # site -> the names folded into its weight
    for m in folding.values():
        if not isinstance(m, FullCopy) and m.site_name in sites:
            by_site.setdefault(m.site_name, []).append(m.adapter_name)
    by_weight = {id(gm.get_parameter(sites[name].weight)): name for name in by_site}
    staying = {p for p in adapter_modules(gm) if p not in folding}
    for n in gm.graph.nodes:
        tag = get_tag(n)
        if n.op != "get_attr" or tag is None or tag.role is not Role.BASE_WEIGHT or tag.module not in staying:
            continue
        name = by_weight.get(id(_attr(gm, n.target)))
        if name is not None and tag.site != name:
            raise MergeError(f"cannot fold {sorted(by_site[name])} into {sites[name].weight!r}: "
                             f"adapter {tag.adapter!r} ({tag.method}) at {tag.site!r} computes with that weight, and "
                             "the fold would change its outputs, so the merged graph would not compute what the "
                             "unmerged one does. Keep these adapters unmerged, or remove "
                             f"{tag.adapter!r} first (fxpeft.delete_adapter); nothing was merged")


def _own_readers(site: Site) -> set[fx.Node]:
    return {c.weight_user or c.node for c in site.calls}


def _untie(gm: fx.GraphModule, site: Site, merged: torch.Tensor, weight: nn.Parameter) -> str:
    """Give ``site`` its own parameter holding ``merged``; the other readers keep ``weight``. Returns its name."""
    new = nn.Parameter(merged, requires_grad=weight.requires_grad)
    if site.calls[0].weight_node is None:  # call_module: the module owns the attribute
        gm.get_submodule(site.name).weight = new
        return f"{site.name}.weight"
    want = f"{site.name}.weight" if site.weight.rpartition(".")[2] == "weight" else f"{site.weight}_merged"
    aliases = [n for n, p in gm.named_parameters(remove_duplicate=False) if p is weight]
    own = {c.weight_user for c in site.calls}
    for n in gm.graph.nodes:  # other readers that reach the weight through ``want`` move to another alias
        # (a get_attr node can be shared by the site and another reader: ep.module() reads a tied weight once)
        if n.op == "get_attr" and n.target == want and any(u not in own for u in n.users):
            other = [a for a in aliases if a != want]
            if not other:
                want = f"{want}_merged"
                break
            n.target = other[0]
    _set_param(gm, want, new)
    for call in site.calls:
        with gm.graph.inserting_before(call.weight_user):
            node = gm.graph.get_attr(want)
        node.meta.update({k: v for k, v in call.weight_node.meta.items() if k != TAG_KEY})
        call.weight_user.replace_input_with(call.weight_node, node)
    return want


@dataclass(frozen=True)
class MergeAdapters:
    """Fold adapters into the base weights and remove them, leaving a plain graph.

    Idempotent: a graph without adapters is returned unchanged with ``modified=False``. Atomic: weights written
    before a failure are put back.

    Args:
        adapter_names: merge only these adapters (default: all). Others stay in the graph, unmerged. An unknown
            name raises :class:`fxpeft.ConfigError` listing the names present.

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes import MergeAdapters
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> MergeAdapters()(gm).modified, MergeAdapters()(gm).modified
        (True, False)
    """

    adapter_names: tuple[str, ...] | None = None

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        mods = select_adapters(gm, self.adapter_names)
        if not mods:
            lint(gm)
            return PassResult(gm, False)
        sites = find_sites(gm, SITE_KINDS)
        copies = [m for m in mods.values() if isinstance(m, FullCopy)]
        plan: dict[str, list[AdapterModule]] = {}
        for path, m in site_adapters(mods).items():
            if m.site_name not in sites:
                raise MergeError(f"adapter {path!r} sits on {m.site_name!r}, which is no longer a call site of this "
                                 "graph; was the graph edited by hand?")
            plan.setdefault(m.site_name, []).append(m)
        refuse_foreign_reads(gm, sites, mods)
        with torch.no_grad(), transaction(gm) as txn:
            write_copies(gm, copies, txn)  # first: a bias a method folds into is the trained copy's
            folded, sums = {}, []
            for name, group in plan.items():  # nothing stays written unless every merge is finite
                weight, bias, w, b = _folded(gm, sites[name], group)
                sums += [_finite_probe(t, weight.dtype) for t in (w, b) if t is not None]
                # each fold computed once, kept in the weight's dtype: the memory the write swaps in anyway (the
                # old data stays referenced until the transaction commits)
                folded[name] = (weight, bias, w.to(weight.dtype),
                                None if b is None else b.to((bias if bias is not None else weight).dtype))
                del w, b
            # one host sync for every fp32 fold's finiteness (a NaN/inf anywhere makes its sum non-finite)
            if sums and not torch.isfinite(torch.stack([t.to(sums[0].device) for t in sums])).all():
                _raise_not_finite(gm, sites, plan)
            _write(gm, sites, folded, txn)
            detach_adapters(gm, mods)
            restore_base_flags(gm)
            lint(gm)
            defer_codegen(gm)  # generated at the graph's first use, as after a rewrite
        return PassResult(gm, True)


def _finite_probe(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d tensor finite iff the fp32 fold ``t`` fits ``dtype``, for one batched check: for fp32 its sum (no host
    sync; a NaN/inf anywhere makes it non-finite); for a narrower dtype the range check runs here (:func:`_fits`)."""
    if dtype == torch.float32 or not dtype.is_floating_point:
        return t.sum().reshape(())
    return t.new_full((), float("nan")) if not _fits(t, dtype) else t.new_zeros(())


def _raise_not_finite(gm: fx.GraphModule, sites: dict[str, Site], plan: dict[str, list[AdapterModule]]) -> None:
    """Name the first site whose merge is not finite (recomputed: only on the failure path)."""
    for name, group in plan.items():
        weight, _, w, b = _folded(gm, sites[name], group)
        if not (_fits(w, weight.dtype) and (b is None or _fits(b, weight.dtype))):
            raise MergeError(f"merging {[m.adapter_name for m in group]} into {sites[name].weight!r} gives "
                             "non-finite values (NaN/inf); the adapter weights have diverged. Nothing was "
                             "merged; check the training (learning rate, loss scaling) or reload a good adapter.")
    raise MergeError("merging gives non-finite values (NaN/inf); the adapter weights have diverged. Nothing was "
                     "merged; check the training (learning rate, loss scaling) or reload a good adapter.")


def _folded(gm: fx.GraphModule, site: Site, group: list[AdapterModule]):
    """fp32 weight/bias with every adapter of ``group`` folded in, after the originals."""
    weight = gm.get_parameter(site.weight)
    bias = gm.get_parameter(site.bias) if site.bias else None
    w, b = weight.detach().float(), None if bias is None else bias.detach().float()
    for m in group:
        w, b = PeftRegistry.get(m.method).fold(m, site, w, b)
    return weight, bias, w, b


def _write(gm: fx.GraphModule, sites: dict[str, Site], folded: dict[str, tuple], txn: Transaction) -> None:
    """Give each merged parameter its merged data (``folded``: site -> weight, bias, and their merged values in
    the weight's dtype), one site at a time (the old data is kept, by reference, until the transaction ends, so a
    failure puts it back); a weight tied to another call site is untied instead."""
    readers = _readers_index(gm)
    for name, (weight, bias, w, b) in folded.items():
        site = sites[name]
        own = _own_readers(site)
        if any(u not in own for u in readers.get(id(weight), ())):
            where = _untie(gm, site, w, weight)
            readers[id(weight)] = [u for u in readers[id(weight)] if u not in own]
            warnings.warn(f"merge: {site.name!r} shares its weight with another call site (tied weights); "
                          f"the merged weight is a new parameter {where!r} and the other site is unchanged")
        else:
            txn.replace_data(weight, w)
        if bias is not None and b is not None:
            txn.replace_data(bias, b)
        elif b is not None:  # a method's bias (LoRA's lora_bias) on a site without one: the site gets a bias
            _add_bias(gm, site, b, weight)


def _add_bias(gm: fx.GraphModule, site: Site, value: torch.Tensor, weight: nn.Parameter) -> None:
    """Give a site without a bias a new bias parameter holding ``value``, applied by each of its calls: as the
    op's own bias argument where it has one (linear, conv, a module's ``bias``), else as an add after the call."""
    info = graph_info(gm)
    flag = (info.frozen or {}).get(site.weight, weight.requires_grad)
    new = nn.Parameter(value, requires_grad=flag)
    module = _attr(gm, site.name)
    if all(c.node.op == "call_module" for c in site.calls):
        module.bias = new  # nn.Linear/Conv call F.linear/conv with self.bias
        return
    if isinstance(module, nn.Module) and site.weight == f"{site.name}.weight" and getattr(module, "bias", None) is None:
        path = f"{site.name}.bias"
        if "bias" in module._parameters:
            del module._parameters["bias"]  # registered as None (bias=False): make room
    else:
        path = f"{site.weight}_bias"
    _set_param(gm, path, new)
    for call in site.calls:
        node = call.node
        with gm.graph.inserting_before(node):
            read = gm.graph.get_attr(path)
        if node.op == "call_module":
            raise MergeError(f"{site.name!r} is called both as a module and functionally; cannot give it a bias")
        if node.target in _BIAS_AT_2 and (len(node.args) == 2 and "bias" not in node.kwargs
                                           or len(node.args) > 2 and node.args[2] is None):
            node.args = (*node.args[:2], read, *node.args[3:])
            continue
        if site.kind != "linear":
            raise MergeError(f"cannot give the {site.kind} site {site.name!r} a bias (op {node.target}); merge fails")
        export = graph_info(gm).dialect == "export"
        with gm.graph.inserting_after(node):
            add = gm.graph.call_function(aten.add.Tensor if export else torch.add, (node, read))
        node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
        if "nn_module_stack" in node.meta:
            add.meta["nn_module_stack"] = dict(node.meta["nn_module_stack"])


aten = torch.ops.aten
# ops whose third argument is the bias (None when there is none)
_BIAS_AT_2 = {aten.linear.default, torch.nn.functional.linear, torch._C._nn.linear, aten.conv1d.default,
              aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
              aten.convolution.default, torch.nn.functional.conv1d, torch.nn.functional.conv2d,
              torch.nn.functional.conv3d}
