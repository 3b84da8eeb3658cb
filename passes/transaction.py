"""All-or-nothing graph edits: a pass that fails part-way, for any reason, leaves the graph as it was.

:func:`transaction` snapshots what a pass can change, cheaply (references, not tensors): the node order and
every node's arguments, each module's parameter / buffer / submodule tables, ``requires_grad`` flags and the
graph's info record. Tensors a pass writes in place are registered with :meth:`Transaction.will_write`,
which keeps a copy of their data until the pass commits; :meth:`Transaction.replace_data` swaps a
parameter's data and keeps the old data by reference (no copy).
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Iterator

import torch
from torch import fx

from fxpeft.serialize import codegen_deferred, defer_codegen
from fxpeft.tags import INFO_KEY, graph_info, set_graph_info

__all__ = ["Transaction", "transaction", "lint"]


_LEGAL_OPS = frozenset({"placeholder", "call_method", "call_module", "call_function", "get_attr", "output", "root"})


def lint(gm: fx.GraphModule) -> None:
    """The checks of ``gm.graph.lint()`` (nodes owned by the graph, topological order, unique names, targets that
    exist), with each target path resolved once: torch's lint walks every ``get_attr``/``call_module`` target from
    the root through ``nn.Module.__getattr__``, most of its cost on a big graph. On any failure torch's own lint runs,
    so the error is torch's.

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes.transaction import lint
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        >>> lint(gm)
    """
    graph = gm.graph
    if not _lint_ok(gm, graph):
        graph.lint()  # raises torch's error for what failed here
        raise RuntimeError("graph lint failed")  # torch's lint found nothing: should not happen


def _lint_ok(gm: fx.GraphModule, graph: fx.Graph) -> bool:
    seen: set[fx.Node] = set()
    names: set[str] = set()
    table = graph._find_nodes_lookup_table
    for node in graph.nodes:
        if node.op not in _LEGAL_OPS or node.graph is not graph or node not in table or node.name in names:
            return False
        if not all(a in seen for a in node._input_nodes):
            return False
        seen.add(node)
        names.add(node.name)
    if graph.owning_module is None:
        return True
    objects: dict[str, object] = {"": graph.owning_module}

    def resolve(path: str) -> object:  # None when an atom is missing, as torch's lint reads it
        if path not in objects:
            parent, _, atom = path.rpartition(".")
            owner = resolve(parent)
            objects[path] = None if owner is None else getattr(owner, atom, None)
        return objects[path]

    for node in graph.nodes:
        if node.op == "call_function":
            if not callable(node.target):
                return False
        elif not isinstance(node.target, str):
            return False
        elif node.op in ("get_attr", "call_module"):
            if resolve(node.target) is None:
                return False
            if node.op == "call_module":  # every atom of the path is a module
                atoms = node.target.split(".")
                if not all(isinstance(resolve(".".join(atoms[:i + 1])), torch.nn.Module) for i in range(len(atoms))):
                    return False
    return True


#: the transaction open on each graph (by id), so that nested ones join it instead of snapshotting again.
_OPEN: dict[int, Transaction] = {}


class Transaction:
    """What :func:`transaction` restores on failure."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.args = [(n.args, n.kwargs) for n in self.nodes]
        self.tables = [(m, dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in gm.modules()]
        self.grads = [(p, p.requires_grad) for p in gm.parameters()]
        meta = getattr(gm, "meta", None)
        self.info = copy.copy(meta.get(INFO_KEY)) if isinstance(meta, dict) else None
        # stale code waiting for its first use stays deferred: reading it here would generate it for nothing
        self.deferred = codegen_deferred(gm)
        self.code = gm.code if hasattr(gm, "_code") and not self.deferred else None
        self.codegen = gm.graph._codegen  # passes that change the calling convention give the graph a new one
        self.written: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.undo: list = []

    def replace_data(self, t: torch.Tensor, new: torch.Tensor) -> None:
        """Give ``t`` (a parameter) ``new`` as its data, keeping the old data (a reference, not a copy) until the
        transaction ends: cheaper than :meth:`will_write` plus an in-place copy, and every holder of ``t`` sees it."""
        old = t.data
        t.data = new
        self.undo.append(lambda: setattr(t, "data", old))

    def on_rollback(self, fn) -> None:
        """Call ``fn()`` if the transaction rolls back (state outside the graph and the module tables)."""
        self.undo.append(fn)

    def will_write(self, t: torch.Tensor) -> None:
        """Keep a copy of ``t``'s data: the pass is about to write it in place."""
        self.written.append((t, t.detach().clone()))

    def rollback(self) -> None:
        graph = self.gm.graph
        # An erased node cannot be put back in the list: stand a fresh node in for it, same name and meta.
        stand_in = {}
        for node in self.nodes:
            if node._erased:
                new = graph.create_node(node.op, node.target, (), {}, type_expr=node.type)
                new.name, new.meta = node.name, node.meta
                stand_in[node] = new
        swap = lambda a: fx.node.map_arg(a, lambda n: stand_in.get(n, n))  # noqa: E731
        for node, (args, kwargs) in zip(self.nodes, self.args):
            node = stand_in.get(node, node)
            node.args, node.kwargs = swap(args), swap(kwargs)  # also restores every use list
        keep = {stand_in.get(n, n) for n in self.nodes}
        added = [n for n in graph.nodes if n not in keep]
        for node in added:  # only added nodes use added nodes now: cut those links, then erase
            node.args, node.kwargs = (), {}
        for node in reversed(added):
            graph.erase_node(node)
        prev = graph._root
        for node in self.nodes:  # restore the order (a pass may have moved nodes)
            node = stand_in.get(node, node)
            if prev.next is not node:
                prev.append(node)
            prev = node
        for m, params, buffers, modules in self.tables:
            for table, saved in ((m._parameters, params), (m._buffers, buffers), (m._modules, modules)):
                table.clear()
                table.update(saved)
        with torch.no_grad():
            for t, data in self.written:
                t.copy_(data)
        for fn in reversed(self.undo):
            fn()
        for p, flag in self.grads:
            p.requires_grad_(flag)
        if self.info is not None:
            self.gm.meta[INFO_KEY] = self.info
        graph._codegen = self.codegen
        if self.deferred:
            defer_codegen(self.gm)
        elif self.code is not None and self.gm.code != self.code:
            self.gm.recompile()


@contextlib.contextmanager
def transaction(gm: fx.GraphModule) -> Iterator[Transaction]:
    """Run a block of graph edits all-or-nothing: on any exception (``KeyboardInterrupt`` too) ``gm`` is
    restored, then the exception propagates. Nested blocks on one graph join the outermost one.

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes.transaction import transaction
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        >>> before = gm.code
        >>> try:
        ...     with transaction(gm):
        ...         gm.graph.erase_node(list(gm.graph.nodes)[-1]); raise RuntimeError("boom")
        ... except RuntimeError:
        ...     pass
        >>> gm.code == before
        True
    """
    outer = _OPEN.get(id(gm))
    if outer is not None:  # nested (a pass inside a pipeline): the outermost transaction restores everything
        yield outer
        return
    # A pass allocates thousands of small objects (nodes, tags, modules), so the cyclic GC runs many times during it,
    # and its older generations walk the whole heap (the model's graph with it): a large share of a big rewrite's
    # time. A pass leaves no garbage cycles worth collecting mid-way, so collection waits until it ends.
    paused = gc.isenabled()
    gc.disable()
    try:
        txn = _OPEN[id(gm)] = Transaction(gm)
        try:
            yield txn
            info = graph_info(gm)  # committed: what was built from the old graph is stale now
            info.generation += 1
            set_graph_info(gm, info)
        except BaseException:
            txn.rollback()
            raise
        finally:
            del _OPEN[id(gm)]
    finally:
        if paused:
            gc.enable()
