"""Deep copies and pickles of fxpeft graphs that keep the graph itself: node tags, ``GraphInfo``, codegen.

``torch.fx.GraphModule.__reduce__`` saves only the generated Python code and re-traces it with
``symbolic_trace`` on load. For fxpeft graphs that is wrong in two ways:

* every ``node.meta`` is lost (fxpeft's :class:`~fxpeft.tags.AdapterTag`, ``nn_module_stack``) and so is
  ``gm.meta`` (:class:`~fxpeft.tags.GraphInfo`): ``fxpeft.merge`` on the loaded graph then finds no adapter
  and silently merges nothing;
* an export graph cannot be pickled at all: ``ep.module()`` adds a ``_guards_fn`` submodule whose
  ``forward`` is a closure made with ``exec`` (``AttributeError: Can't pickle local object
  'wrap_dunder_call_ctx_manager.<locals>.inner'``), and ``torch.ops.aten.*`` ``OpOverload`` targets do not
  pickle either (``RuntimeError: ... pybind11 ... is not pickleable``).

:func:`make_picklable` (called by :func:`fxpeft.trace`) moves a graph module to :class:`FxPeftGraphModule`,
whose ``__reduce__`` saves the ``fx.Graph`` node by node (op, target, args, kwargs, name, type and every
picklable ``node.meta`` entry; FakeTensor ``val``/``tensor_meta`` are dropped), the codegen object
(``_PyTreeCodeGen`` with its pytree info, fxpeft's ``_DefaultsCodeGen``), and the module's state
(submodules, parameters with ``requires_grad``, buffers, ``meta``) in one pickle, so tied parameters stay
tied. Loading rebuilds exactly that graph: ``gm.code`` is the same string. Operators are saved by name
(``aten::linear.default``) and looked up in ``torch.ops`` on load. ``copy.deepcopy`` keeps torch's own
graph copy (it keeps node meta); only the class name is restored.

Only ``torch.load(f, weights_only=False)`` can load such a file (it is a pickle: load only files you trust).
For files that need no fxpeft graph at all, use :func:`fxpeft.save_adapter` or :func:`fxpeft.export`.

Example:
    >>> import io, torch, fxpeft
    >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
    ...                     fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    >>> f = io.BytesIO(); torch.save(gm, f); _ = f.seek(0)
    >>> back = torch.load(f, weights_only=False)
    >>> back.code == gm.code and len(fxpeft.adapters(back)) == 1
    True
"""

from __future__ import annotations

import io
import marshal
import builtins
import math
import pickle
import re
import sys
import types
import warnings
from typing import Any

import torch
from torch import fx

from .errors import InputShapeError, SerializationError
from .scope import CallScope

__all__ = ["SerializationError", "FxPeftGraphModule", "make_picklable", "defer_codegen", "codegen_deferred"]

_FORMAT = 1
#: node.meta entries that are never saved: fake/symbolic tensors of the trace (re-derivable, not picklable).
_DROP_META = frozenset({"val", "example_value", "tensor_meta", "unbacked_bindings"})
_ADVICE = ("To keep the adapter, use fxpeft.save_adapter(gm, directory) and fxpeft.load_adapter on a fresh "
           "fxpeft.trace of the model; for a deployable file, fxpeft.export(gm, path, args).")


# ---------------------------------------------------------------------------------------------- operators


def _op_ref(obj: Any) -> tuple | None:
    """A by-name reference for a torch operator (they do not pickle), or None for anything else."""
    if isinstance(obj, torch._ops.OpOverload):
        return ("op", obj.namespace, obj._opname, obj._overloadname)
    if isinstance(obj, torch._ops.OpOverloadPacket):
        ns, _, name = obj._qualified_op_name.partition("::")
        return ("packet", ns, name)
    if isinstance(obj, torch._ops.HigherOrderOperator):
        return ("hop", obj.name())
    return None


def _resolve_op(ref: tuple) -> Any:
    kind = ref[0]
    try:
        if kind == "op":
            return getattr(getattr(getattr(torch.ops, ref[1]), ref[2]), ref[3])
        if kind == "packet":
            return getattr(getattr(torch.ops, ref[1]), ref[2])
        if kind == "hop":
            return getattr(torch.ops.higher_order, ref[1])
    except (AttributeError, RuntimeError) as e:
        raise SerializationError(
            f"the saved graph calls operator {'.'.join(ref[1:])}, which this process does not have (load the "
            f"library that registers it before torch.load): {e}") from e
    raise SerializationError(f"unknown operator reference {ref!r} in a saved fxpeft graph")


class _Ref:
    """A node argument that refers to an earlier node, by name (resolved when the graph is rebuilt)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _NodeInMeta(Exception):
    pass


class _GraphPickler(pickle.Pickler):
    """Pickles graph data: operators by name, nodes as :class:`_Ref` (only where ``nodes_ok``)."""

    def __init__(self, f, nodes_ok: bool):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.nodes_ok = nodes_ok

    def persistent_id(self, obj):
        if isinstance(obj, fx.Node):
            if not self.nodes_ok:
                raise _NodeInMeta
            return ("node", obj.name)
        return _op_ref(obj)


class _GraphUnpickler(pickle.Unpickler):
    def persistent_load(self, pid):
        return _Ref(pid[1]) if pid[0] == "node" else _resolve_op(pid)


def _dumps(obj: Any, nodes_ok: bool) -> bytes:
    f = io.BytesIO()
    _GraphPickler(f, nodes_ok).dump(obj)
    return f.getvalue()


def _loads(data: bytes) -> Any:
    with warnings.catch_warnings():  # torch's own TreeSpec unpickling warns about its LeafSpec deprecation
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return _GraphUnpickler(io.BytesIO(data)).load()


# ---------------------------------------------------------------------------------------------- graph


def _picklable_meta(meta: dict, cache: dict) -> dict:
    """The node.meta entries that pickle (the fxpeft tag, nn_module_stack, stack_trace, ...)."""
    kept = {}
    for key, value in meta.items():
        if key in _DROP_META:
            continue
        ok = cache.get(id(value))
        if ok is None:
            try:
                _dumps(value, nodes_ok=False)
                ok = True
            except Exception:
                ok = False
            cache[id(value)] = ok
        if ok:
            kept[key] = value
    return kept


def _tracer_cls(graph: fx.Graph):
    cls = graph._tracer_cls
    return cls if cls is not None and "<locals>" not in cls.__qualname__ else None


def _graph_state(graph: fx.Graph) -> bytes:
    cache: dict[int, bool] = {}
    nodes = [(n.name, n.op, n.target, n.args, n.kwargs, n.type, _picklable_meta(n.meta, cache)) for n in graph.nodes]
    state = {"nodes": nodes, "codegen": graph._codegen, "tracer_cls": _tracer_cls(graph),
             "tracer_extras": graph._tracer_extras}
    try:
        return _dumps(state, nodes_ok=True)
    except Exception as e:
        culprit = "the graph's codegen" if not _pickles(state["codegen"]) else None
        for node, entry in zip(graph.nodes, nodes):
            if culprit is None and not _pickles(entry[1:6]):
                culprit = f"node {node.name} ({node.op} {node.target!r})"
        raise SerializationError(f"cannot pickle {culprit or 'the graph'}: {type(e).__name__}: {e}. {_ADVICE}") from e


def _pickles(obj: Any) -> bool:
    try:
        _dumps(obj, nodes_ok=True)
        return True
    except Exception:
        return False


def _build_graph(data: bytes) -> fx.Graph:
    state = _loads(data)
    graph = fx.Graph(tracer_cls=state["tracer_cls"], tracer_extras=state["tracer_extras"])
    graph._codegen = state["codegen"]
    env: dict[str, fx.Node] = {}

    def resolve(a):
        return env[a.name] if isinstance(a, _Ref) else a

    for name, op, target, args, kwargs, type_expr, meta in state["nodes"]:
        node = graph.create_node(op, target, fx.node.map_aggregate(args, resolve),
                                 fx.node.map_aggregate(kwargs, resolve), name=name, type_expr=type_expr)
        if node.name != name:  # cannot happen for names a Graph made; a changed name would change gm.code
            raise SerializationError(f"rebuilding the graph renamed node {name} to {node.name}")
        node.meta.update(meta)
        env[name] = node
    return graph


# ---------------------------------------------------------------------------------------------- export guards


def _guard_function(guards: torch.nn.Module):
    """The exec-made function inside a ``GuardsFn``'s ``forward`` (a dynamo ``dont_skip_tracing`` wrapper)."""
    fwd = guards.__dict__.get("forward")
    if fwd is None:
        return None
    for cell in getattr(fwd, "__closure__", None) or ():
        fn = cell.cell_contents
        if isinstance(fn, types.FunctionType) and fn.__name__ == "_" and fn.__code__.co_filename == "<string>":
            return fn
    raise SerializationError(f"cannot pickle the graph's export guard module (its forward is {fwd!r}, not the "
                             f"function torch.export makes in this torch version). {_ADVICE}")


def _guard_globals() -> dict:
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    # what torch.export._unlift gives the guard code; __builtins__ too, which Dynamo looks up when it traces it
    return {**SYMPY_INTERP, "math": math, "inf": float("inf"), "__builtins__": builtins}


def _rebuild_guards(cls: type, state: dict, code: bytes | None, python: tuple) -> torch.nn.Module:
    mod = cls.__new__(cls)
    mod.__setstate__(state)
    if code is not None:
        if tuple(python) != tuple(sys.version_info[:2]):
            raise SerializationError(
                f"this export graph was pickled by Python {'.'.join(map(str, python))}; its input guards can only be "
                f"loaded by that Python (this is {sys.version_info[0]}.{sys.version_info[1]}). Re-trace the model "
                f"and use fxpeft.load_adapter instead, or load a fxpeft.export .pt2.")
        fn = types.FunctionType(marshal.loads(code), _guard_globals(), "_")
        mod.forward = torch._dynamo.dont_skip_tracing(fn)
    return mod


def _reduce_guards(self):
    """``__reduce__`` of the export guard module: its guard function travels as a marshalled code object."""
    fn = _guard_function(self)
    state = {k: v for k, v in self.__dict__.items() if k != "forward"}
    code = marshal.dumps(fn.__code__) if fn is not None else None
    return _rebuild_guards, (type(self), state, code, tuple(sys.version_info[:2]))


try:
    from torch.export._unlift import GuardsFn as _GuardsFn
except ImportError:  # a torch without export guard modules
    _GuardsFn = None
    PicklableGuardsFn = None
else:
    class PicklableGuardsFn(_GuardsFn):
        """torch.export's ``GuardsFn`` (the ``_guards_fn`` submodule of ``ep.module()``), picklable, and with
        errors that name the input dim and why the trace fixed it (``fxpeft_reasons``, from :func:`fxpeft.trace`)."""

        __reduce__ = _reduce_guards

        def __call__(self, *args, **kwargs):
            if torch.compiler.is_compiling():
                return super().__call__(*args, **kwargs)
            try:
                return super().__call__(*args, **kwargs)
            except AssertionError as e:
                raise _shape_error(str(e), getattr(self, "fxpeft_reasons", {})) from None


def _shape_error(message: str, reasons: dict[str, str]) -> InputShapeError:
    """Turn torch.export's ``Guard failed: input_ids.size()[0] == 1`` into a message with the dim and the reason."""
    m = re.search(r"(\w+)\.size\(\)\[(\d+)\]\s*==\s*(\d+)", message)
    value = re.search(r"Guard failed: (\w+) == (.+)$", message.strip())
    if m is None and value is not None:  # a non-tensor input torch.export baked in (use_cache=False)
        return InputShapeError(f"input {value.group(1)} must be {value.group(2)}: torch.export baked the value it had "
                               "at trace time into the graph; call it with that value, or re-trace with the other one")
    if m is None:
        return InputShapeError(f"the inputs do not fit the traced graph ({message}); call it as it was traced, or "
                               "re-trace with example inputs of the shapes you need")
    dim = f"{m.group(1)}.shape[{m.group(2)}]"
    why = reasons.get(dim, f"fixed at {m.group(3)} when the model was traced")
    return InputShapeError(f"input {dim} must be {m.group(3)}: it is {why}. Re-trace with example inputs that "
                           "vary there, or pass dynamic_shapes= to fxpeft.trace")


# ---------------------------------------------------------------------------------------------- graph module


class _TensorsElsewhere(pickle.Pickler):
    """A pickler that writes no tensor data: it checks that everything but tensors pickles."""

    def persistent_id(self, obj):
        if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.TypedStorage)):
            return id(obj)
        return _op_ref(obj)


class _Discard:
    def write(self, b):
        return len(b)


#: what recompile() derives from the graph (the pytree specs come from its codegen); not saved.
_REBUILT_ATTRS = ("_graph", "_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec")
#: per-process callbacks and the trace's symbolic shape environment; not saved (reset as GraphModule() sets them).
_RUNTIME_ATTRS = ("_replace_hooks", "_create_node_hooks", "_erase_node_hooks", "_deepcopy_hooks", "shape_env")


class _DeferredForward:
    """The ``forward`` of a graph whose code generation is deferred (:func:`defer_codegen`). Reading it (a call,
    ``torch.compile``, ``torch.export``, ``inspect.signature``) generates the code first; the generated
    ``forward`` then replaces this descriptor on the per-instance class, so later calls cost nothing extra."""

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        if obj is None:
            return self
        obj.recompile()
        return obj.forward

    def __call__(self, obj: Any, *args: Any, **kwargs: Any) -> Any:  # type(gm).forward(gm, ...)
        return self.__get__(obj)(*args, **kwargs)


_DEFERRED = _DeferredForward()


def defer_codegen(gm: fx.GraphModule) -> None:
    """Regenerate ``gm``'s code when it is next needed instead of now (Python code generation and ``compile`` of
    a big graph cost more than the edit that made them stale). Only :class:`FxPeftGraphModule` defers: the first
    access to ``forward`` (any call), ``code``, ``str(gm)``, a pickle or a copy generates it. Other graph modules
    recompile at once."""
    if isinstance(gm, FxPeftGraphModule) and type(gm) is not FxPeftGraphModule:
        type(gm).forward = _DEFERRED  # the per-instance class holds forward (GraphModule.__new__)
    else:
        gm.recompile()


def codegen_deferred(gm: fx.GraphModule) -> bool:
    """Whether ``gm``'s code is stale, waiting for its first use (:func:`defer_codegen`)."""
    return vars(type(gm)).get("forward") is _DEFERRED


class FxPeftGraphModule(fx.GraphModule):
    """The ``GraphModule`` class of graphs made by :func:`fxpeft.trace`: it pickles and deep-copies with its graph.

    Like every ``GraphModule``, each instance gets its own subclass (which holds its ``forward``). Its code can
    be generated lazily (:func:`defer_codegen`): ``code`` and ``str()`` generate it first.
    """

    @property
    def code(self) -> str:
        if codegen_deferred(self):
            self.recompile()
        return super().code

    def __str__(self) -> str:
        if codegen_deferred(self):
            self.recompile()
        return super().__str__()

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items()
                 if k not in _REBUILT_ATTRS + _RUNTIME_ATTRS}
        meta = state.get("meta")
        if isinstance(meta, dict):
            state["meta"] = {k: v for k, v in meta.items() if _pickles(v)}
        graph = _graph_state(self.graph)
        try:  # everything but tensor data, so that a failure is an fxpeft error and not a half-written file
            _TensorsElsewhere(_Discard(), protocol=pickle.HIGHEST_PROTOCOL).dump(state)
        except Exception as e:
            raise SerializationError(f"cannot pickle {type(self).__name__}: {type(e).__name__}: {e}. "
                                     f"{_ADVICE}") from e
        base = next(c for c in type(self).__mro__ if c.__qualname__.split(".")[-1] != "GraphModuleImpl")
        return _rebuild_graph_module, (_FORMAT, base, type(self).__name__, state, graph)

    # One code object serves every fxpeft graph class, so torch.compile must not make it the compiled frame:
    # its cache is per code object, and the 9th graph compiled in a process would hit the recompile limit
    # (a hard failure under fullgraph=True). Skipping only this frame lets dynamo compile each graph's own forward.
    @torch.compiler.disable(recursive=False)
    def __call__(self, *args, adapter_names=None, **kwargs):
        with CallScope():  # what the sites of this call share, and only this call (fxpeft.scope)
            # PEFT's mixed batch: one adapter name per row, served by the graph's mixed-batch twin (fxpeft.mixed)
            if adapter_names is None:
                return super().__call__(*args, **kwargs)
            from .mixed import call_mixed

            return call_mixed(self, args, kwargs, adapter_names)

    def __deepcopy__(self, memo):
        # torch's deepcopy copies the graph with node.meta (tags intact) and the state through the memo (tied
        # parameters stay tied); it only names the copy's class "GraphModule".
        with warnings.catch_warnings():  # torch's own TreeSpec copy warns about its LeafSpec deprecation
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            res = super().__deepcopy__(memo)
        type(res).__name__ = type(self).__name__
        for attr in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):  # GraphModule.__init__ drops hooks
            getattr(res, attr).update(getattr(self, attr))  # (fxpeft.weights guards a graph on meta weights)
        return res


def _rebuild_graph_module(fmt: int, cls: type, class_name: str, state: dict, graph: bytes) -> fx.GraphModule:
    if fmt != _FORMAT:
        raise SerializationError(f"this fxpeft graph was pickled in format {fmt}; this fxpeft reads format "
                                 f"{_FORMAT}. {_ADVICE}")
    gm = cls.__new__(cls)  # GraphModule.__new__: a fresh per-instance subclass
    type(gm).__name__ = class_name
    torch.nn.Module.__setstate__(gm, state)
    for attr in _RUNTIME_ATTRS:
        setattr(gm, attr, None if attr == "shape_env" else [])
    gm.graph = _build_graph(graph)  # sets owning_module and recompiles: forward, _code, _in_spec/_out_spec
    return gm


def make_picklable(gm: fx.GraphModule) -> fx.GraphModule:
    """Move ``gm`` (in place) to :class:`FxPeftGraphModule` and its export guard module to a picklable class.

    Returns ``gm``; its behaviour, state and ``gm.code`` are unchanged.
    """
    if _GuardsFn is not None:
        for mod in gm.modules():
            if type(mod) is _GuardsFn:
                mod.__class__ = PicklableGuardsFn
    if not isinstance(gm, FxPeftGraphModule):
        impl = type("GraphModuleImpl", (FxPeftGraphModule,), {"__module__": fx.graph_module.__name__})
        impl.__name__ = type(gm).__name__
        gm.__class__ = impl
        gm.recompile()  # forward and __call__ live on the per-instance class
    return gm
