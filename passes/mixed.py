"""The mixed-batch pass: a graph that serves a different adapter on each batch row.

The pass builds a second graph from an adapted one. It shares every parameter and module with it, takes one
more input (the row index, ``int64 [batch]``), and at each site lets the site's method compute every row with
that row's adapter (:meth:`fxpeft.Method.insert_mixed`): gathered weights and batched matmuls, so the cost per
token is that of one adapter whatever the number of adapters. Row index ``0`` means no adapter (``"__base__"``),
``i`` the ``i``-th adapter of :func:`fxpeft.adapter_names`; the graph's :class:`~fxpeft.GraphInfo` records
the table. Gradients flow from each row into that row's adapter only, so one batch trains several adapters.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpeft.copies import FullCopy
from fxpeft.errors import InputShapeError, MergeError, UnsupportedSiteError
from fxpeft.inputs import add_input
from fxpeft.registry import AdapterModule, Emit, PeftRegistry
from fxpeft.serialize import FxPeftGraphModule
from fxpeft.sites import SITE_KINDS, Call, Site, find_sites
from fxpeft.tags import AdapterTag, Role, graph_info, set_graph_info

from .inject import adapter_modules, ordered_names
from .remove import erase_adapter_nodes

__all__ = ["MixedBatch", "BASE", "INDEX_INPUT", "check_row_index"]

#: the name of "no adapter" in a mixed batch (PEFT's name for it)
BASE = "__base__"
#: the name of the row-index input of a mixed-batch graph
INDEX_INPUT = "adapter_index"


def check_row_index(index: torch.Tensor | None, batch_source: torch.Tensor, slots: int) -> torch.Tensor:
    """The graph's first step on the row index: a clear error for a missing or misshapen one."""
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        got = f"a {index.dtype} tensor of shape {tuple(index.shape)}" if isinstance(index, torch.Tensor) else index
        raise InputShapeError(f"{INDEX_INPUT} must be a 1-D int64 tensor with one adapter index (0..{slots - 1}) "
                              f"per batch row, got {got}; build it with fxpeft.adapter_index(gm, names)")
    n, batch = index.shape[0], batch_source.shape[0]
    if isinstance(n, int) and isinstance(batch, int) and n != batch:
        raise InputShapeError(f"{INDEX_INPUT} has {n} entries but the batch has {batch} rows; give one per row")
    torch._check(n == batch)  # under torch.export / compile: the index and the batch share their size
    return index.long()


def _copy_graph(graph: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``graph`` (nodes, meta, calling convention), and the map from each node to its copy."""
    new, val_map = fx.Graph(tracer_cls=graph._tracer_cls), {}
    out, old_out = new.graph_copy(graph, val_map, return_output_node=True)
    new._codegen = copy.deepcopy(graph._codegen)
    new.output(out, type_expr=getattr(old_out, "type", None)).meta = copy.copy(old_out.meta)
    return new, val_map


def _slots(gm: fx.GraphModule) -> tuple[tuple[str, ...], dict[str, list[AdapterModule | None]]]:
    """The row-index table, and each adapted site's adapter per index (None where a row gets the base)."""
    mods = adapter_modules(gm)
    copied = sorted({m.adapter_name for m in mods.values() if isinstance(m, FullCopy)})
    if copied:
        raise UnsupportedSiteError(f"adapters {copied} train full copies (modules_to_save or biases), which have no "
                                   "mixed-batch form yet; serve them one at a time (fxpeft.set_adapter) or merge them")
    merged = sorted({m.adapter_name for m in mods.values() if m.merged})
    if merged:
        raise MergeError(f"adapters {merged} are merged into the weights; a mixed batch needs unmerged adapters: "
                         "call fxpeft.unmerge_adapter(gm) first")
    table = (BASE, *ordered_names(mods.values()))
    per_site: dict[str, list[AdapterModule | None]] = {}
    for m in mods.values():
        per_site.setdefault(m.site_name, [None] * len(table))[table.index(m.adapter_name)] = m
    return table, per_site


def _methods(slots: list[AdapterModule | None]):
    return {PeftRegistry.get(m.method) for m in slots if m is not None}


@dataclass(frozen=True)
class MixedBatch:
    """Build the mixed-batch graph of an adapted graph (a new ``GraphModule``; ``gm`` is not changed).

    Raises:
        MergeError: an adapter is merged into the weights (unmerge it first).
        UnsupportedSiteError: a method has no mixed-batch form, or a site holds adapters of two methods.

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes import MixedBatch
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
        >>> gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> mixed = MixedBatch()(gm).graph_module
        >>> mixed(torch.randn(3, 4), adapter_index=torch.tensor([0, 1, 1])).shape
        torch.Size([3, 4])
        >>> MixedBatch()(mixed).modified  # already a mixed-batch graph
        False
    """

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        info = graph_info(gm)
        if info.adapter_table is not None:
            return PassResult(gm, False)
        table, per_site = _slots(gm)
        for name, slots in per_site.items():
            if len(_methods(slots)) > 1:
                raise UnsupportedSiteError(f"site {name!r} holds adapters of several methods; a mixed batch "
                                           "needs one method per site")
        sites = {n: s for n, s in find_sites(gm, SITE_KINDS).items() if n in per_site}
        graph, val_map = _copy_graph(gm.graph)
        erase_adapter_nodes(graph, adapter_modules(gm).keys())
        export = info.dialect == "export"
        index = add_input(graph, INDEX_INPUT, export)  # the row index: a keyword after the model's inputs
        # shares gm's parameters and modules (by reference): training the mixed graph trains gm's adapters
        mixed = FxPeftGraphModule(gm, graph, class_name=f"{type(gm).__name__}Mixed")
        paths = {}
        for path, m in adapter_modules(gm).items():
            mixed.add_submodule(path, m)
            paths[id(m)] = path
        self._emit(mixed, sites, per_site, val_map, index, paths, export, len(table))
        own = {id(m) for m in gm.modules()}
        for m in mixed.modules():  # its own modules (the containers, a method's helpers) start in gm's mode
            if id(m) not in own:
                m.training = gm.training
        mixed.meta = {**getattr(gm, "meta", {})}
        set_graph_info(mixed, dataclasses.replace(info, adapter_table=table, frozen=None))
        mixed.graph.lint()
        mixed.recompile()
        return PassResult(mixed, True)

    @staticmethod
    def _emit(mixed: fx.GraphModule, sites: dict[str, Site], per_site: dict[str, list[AdapterModule | None]],
              val_map: dict[fx.Node, fx.Node], index: fx.Node, paths: dict[int, str], export: bool,
              slots: int) -> None:
        graph = mixed.graph
        source = next(n for n in graph.nodes if n.op == "placeholder")  # dim 0 of the first input is the batch
        with graph.inserting_after(index):
            checked = graph.call_function(check_row_index, (index, source, slots))
        for name, site in sites.items():
            adapters = per_site[name]
            method = _methods(adapters).pop()
            first = next(m for m in adapters if m is not None)
            for call in site.calls:
                call = Call(val_map[call.node], call.input_pos)
                tag = AdapterTag(method.name, "*", name, paths[id(first)], Role.COMPUTE)
                emit = Emit(mixed, tag, call, site, export)
                emit.index, emit.batch_source, emit.paths = checked, source, paths
                with graph.inserting_before(call.node.next):
                    method.insert_mixed(emit, site, adapters)
