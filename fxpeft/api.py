"""The public pipeline: trace → rewrite → (train) → merge → export."""

from __future__ import annotations

import copy
import inspect
import os
import sys
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.graph import _PyTreeCodeGen

from .atomic import replace_file
from .errors import TraceError
from .io import config_from_peft
from .passes.outline import on_flat_graph
from .pipeline import rewrite_graph
from .registry import AdapterModule
from .tags import INFO_KEY, GraphInfo, graph_info, set_graph_info

__all__ = ["trace", "rewrite", "export", "get_nb_trainable_parameters", "print_trainable_parameters"]


class _DefaultsCodeGen(_PyTreeCodeGen):
    """The export codegen, plus defaults for trailing non-tensor arguments (``use_cache=False``).

    torch.export specialises on non-tensor inputs; giving them their traced value as a default means the
    graph is called like the model (``gm(input_ids=ids)``), and passing another value fails the graph's guard.
    """

    def __init__(self, pytree_info, defaults: dict[str, Any]):
        super().__init__(pytree_info)
        self.defaults = defaults

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def: bool = False) -> str:
        src = super().gen_fn_def(free_vars, maybe_return_annotation, expanded_def=expanded_def)
        head, sep, rest = src.partition("\n")
        for name, value in self.defaults.items():
            head = head.replace(f", {name})", f", {name} = {value!r})").replace(f", {name},", f", {name} = {value!r},")
        return head + sep + rest


def _auto_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, dims: str = "all") -> tuple | dict:
    """Mark tensor dims ``Dim.AUTO`` (dynamic unless the model pins them, e.g. channels).

    ``dims="all"``: every dim; ``"batch-seq"``: dim 0, and dim 1 of integer (token id) tensors;
    ``"none"``: fully static.
    """

    def spec(x):
        if not isinstance(x, torch.Tensor) or dims == "none":
            return None
        if dims == "all":
            keep = range(x.dim())
        else:
            keep = [0, 1] if not x.is_floating_point() else [0]
        return {i: torch.export.Dim.AUTO for i in keep if i < x.dim()}

    try:  # by parameter name: torch.export pairs a tuple of specs with the signature's order, not the call's
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return tuple(pytree.tree_map(spec, a) for a in args) + tuple(pytree.tree_map(spec, v) for v in kwargs.values())
    return {name: pytree.tree_map(spec, v) for name, v in bound.arguments.items()}


def _export_program(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes, strict: bool):
    """torch.export with every dim dynamic; if the model cannot be traced that generally (a kernel bigger
    than a symbolic image, say), retry with batch/sequence dims only, then static, and warn."""
    if dynamic_shapes is not None:
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    first_error = None
    for dims in ("all", "batch-seq", "none"):
        try:
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=_auto_dynamic_shapes(model, args, kwargs, dims),
                                     strict=strict)
        except Exception as e:
            first_error = first_error or e
            continue
        if dims != "all":
            warnings.warn(f"trace: {type(model).__name__} could not be exported with every input dim dynamic "
                          f"({type(first_error).__name__}: {str(first_error).splitlines()[0][:200]}); "
                          f"traced with {'batch/sequence dims dynamic' if dims == 'batch-seq' else 'static shapes'}")
        return ep
    raise first_error


def _own_copies(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Contiguous copies of the example tensors: torch.export's guards on a strided view (``ids[:, 2:10]``)
    would otherwise break later calls with another shape."""
    def own(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone(memory_format=torch.contiguous_format).requires_grad_(x.requires_grad)
        return x

    return pytree.tree_map(own, args), pytree.tree_map(own, kwargs)


def _record_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Record which input dims stayed dynamic and which torch.export fixed; warn about a fixed batch or
    sequence dim (a size-1 example dim, or a length the model itself fixes), and say why."""
    leaves = pytree.tree_leaves((args, kwargs))
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(holders) != len(leaves):
        return
    info = graph_info(gm)
    pytree_info = getattr(gm.graph._codegen, "pytree_info", None)
    names = list(getattr(pytree_info, "orig_args", None) or [])  # the names users call the graph with
    names = names if len(names) == len(holders) else [n.name for n in holders]
    for node, name, x in zip(holders, names, leaves):
        val = node.meta.get("val")
        if not isinstance(x, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        info.dynamic_dims[name] = [i for i, d in enumerate(val.shape) if not is_concrete_int(d)]
        # dim 0 is the batch; dim 1 the sequence of token ids ([B, T]) or of hidden states ([B, T, H])
        watched = [0] + ([1] if x.dim() == 2 and not x.is_floating_point() or x.dim() == 3 else [])
        for i in watched:
            if i < x.dim() and is_concrete_int(val.shape[i]):
                why = ("the example has size 1 there, and torch.export fixes size-1 dims; trace with a batch (and "
                       "sequence) of at least 2" if x.shape[i] == 1 else
                       "the model fixes it (a shape-dependent branch, a fixed-size buffer or a view); pass "
                       "dynamic_shapes= to trace to see where")
                info.specialized[f"{name}.shape[{i}]"] = f"fixed at {x.shape[i]}: {why}"
    set_graph_info(gm, info)
    guards = getattr(gm, "_guards_fn", None)
    if isinstance(guards, nn.Module):  # its errors name the dim and this reason
        guards.fxpeft_reasons = dict(info.specialized)
    for dim, why in info.specialized.items():
        warnings.warn(f"trace: {dim} is {why}. The graph accepts only that size there.")


def _record(gm: fx.GraphModule, model: nn.Module, dialect: str) -> None:
    """Write the graph's :class:`~fxpeft.tags.GraphInfo` (what later passes need to know about the model)."""
    cfg = getattr(model, "config", None)
    transformers = sys.modules.get("transformers")
    is_hf = transformers is not None and isinstance(model, getattr(transformers, "PreTrainedModel", ()))
    head = embedding = None
    if is_hf:  # "all-linear" leaves out exactly what PEFT leaves out
        out = model.get_output_embeddings()
        head = next((n for n, m in model.named_modules() if m is out), "") if out is not None else ""
        try:  # PEFT's default target for methods that adapt the input embedding (get_input_embeddings)
            emb = model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            emb = None
        embedding = next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None
    info = graph_info(gm) if isinstance(getattr(gm, "meta", {}).get(INFO_KEY), GraphInfo) else GraphInfo()
    info.dialect, info.model_type, info.model_class = dialect, getattr(cfg, "model_type", None), type(model).__name__
    info.output_head, info.is_transformers, info.input_embedding = head, is_hf, embedding
    set_graph_info(gm, info)


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes, strict: bool,
            normalize_attention: bool = True, fuse_rms_norm: bool = True) -> fx.GraphModule:
    modes = {m: m.training for m in model.modules()}
    try:
        # Base batch-norm runs on its running statistics (frozen, as a frozen base should be); dropout
        # modules are captured in training mode and turned back into modules, so they follow train()/eval().
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.train()
        ep = _export_program(model, args, kwargs, dynamic_shapes, strict)
    except Exception as e:  # torch.export raises many types; the user needs one clear one
        first = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {first}\n"
            f"Try: strict={not strict}; fewer dynamic dims (dynamic_shapes=...); inputs that take the path you "
            "train on; or trace without inputs (torch.fx.symbolic_trace) with the failing submodule as a leaf "
            "(leaf_modules=...).") from e
    finally:
        for m, mode in modes.items():
            m.training = mode
    ep_mod = ep.module()
    # ep.module() refuses train(); a plain GraphModule over the same graph keeps the calling convention.
    gm = fx.GraphModule(ep_mod, ep_mod.graph, class_name=f"{type(model).__name__}Graph")
    for kind, named in (("parameter", ep_mod.named_parameters), ("buffer", ep_mod.named_buffers)):
        for name, t in named(remove_duplicate=False):  # keep every alias (tied weights) and unused buffer
            parent, _, leaf = name.rpartition(".")
            try:
                owner = gm.get_submodule(parent) if parent else gm
            except AttributeError:
                gm.add_submodule(parent, nn.Module())
                owner = gm.get_submodule(parent)
            if not hasattr(owner, leaf):
                (owner.register_parameter if kind == "parameter" else owner.register_buffer)(leaf, t)
    for path, mod in model.named_modules():  # a layout flag a parameter site reads (transformers' experts stored
        # [E, in, out] say ``is_transposed``): the graph's own submodule keeps it
        if isinstance(getattr(mod, "is_transposed", None), bool) and any(True for _ in mod.parameters(False)):
            try:
                gm.get_submodule(path).is_transposed = mod.is_transposed
            except AttributeError:
                pass
        if isinstance(mod, nn.modules.conv._ConvNd):  # a conv weight read directly is a conv's: sites.py's view
            try:
                gm.get_submodule(path).is_conv = True
            except AttributeError:
                pass
    for path, mod in ep_mod.named_modules():  # keep non-persistent buffers out of state_dict(), as in the model
        if mod._non_persistent_buffers_set:
            owner = gm.get_submodule(path) if path else gm
            owner._non_persistent_buffers_set |= {b for b in mod._non_persistent_buffers_set if b in owner._buffers}
    flat, _ = pytree.tree_flatten((args, kwargs))
    names = gm.graph._codegen.pytree_info.orig_args
    if len(names) == len(flat):
        defaults = {}
        for name, value in reversed(list(zip(names, flat))):
            if isinstance(value, (bool, int, float, str, type(None))):
                defaults[name] = value
            else:
                break
        if defaults:
            gm.graph._codegen = _DefaultsCodeGen(gm.graph._codegen.pytree_info, dict(reversed(defaults.items())))
            gm.recompile()
    from .passes.attention import NormalizeAttention
    from .passes.normalize import DropoutToModule
    from .passes.norms import FuseRMSNorm

    DropoutToModule()(gm)
    if normalize_attention:  # exact: SDPA gets is_causal / grouped K/V where the graph proves them
        NormalizeAttention()(gm)
    if fuse_rms_norm:  # fp32-exact: one kernel instead of six ops, and two tensors saved for backward
        FuseRMSNorm()(gm)
    return gm


def _own_called_modules(gm: fx.GraphModule) -> None:
    """symbolic_trace's GraphModule holds the model's own objects for ``call_module`` targets; replace each by a
    shallow copy (same parameters and buffers), so adapters added under a site land in the graph only, never
    in the traced model (its ``state_dict``, a second trace of it)."""
    targets = dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module")
    for target in sorted(targets, key=lambda t: t.count(".")):  # parents first: a child lands in its parent's copy
        parent, _, leaf = target.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        mod = owner._modules[leaf]
        clone = copy.copy(mod)
        clone._parameters, clone._buffers, clone._modules = dict(mod._parameters), dict(mod._buffers), dict(mod._modules)
        clone._non_persistent_buffers_set = set(mod._non_persistent_buffers_set)
        owner._modules[leaf] = clone


def _takes_use_cache(model: nn.Module) -> bool:
    """An HF model whose config turns its KV cache on by default and whose forward takes ``use_cache``."""
    if not getattr(getattr(model, "config", None), "use_cache", False):
        return False
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def trace(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *, dynamic_shapes=None,
          strict: bool = False, leaf_modules: tuple[type, ...] = (),
          normalize_attention: bool = True, fuse_rms_norm: bool = True) -> fx.GraphModule:
    """Capture ``model`` as a trainable ``torch.fx.GraphModule``.

    With example inputs it uses ``torch.export`` (every tensor dim ``Dim.AUTO``, so batch and sequence
    length stay dynamic) and returns a plain ``GraphModule`` over ``ep.module()``'s graph: it supports
    ``train()``/``eval()``, ``state_dict()``, ``to()`` and optimizers. Without inputs it uses
    ``torch.fx.symbolic_trace``.

    Behaviour notes for export graphs:
      * non-tensor inputs given at trace time (``use_cache=False``) are baked in; they become defaults of
        the graph's ``forward``, and passing a different value fails the graph's guard. An HF model whose
        config enables its KV cache is traced with ``use_cache=False`` unless ``kwargs`` says otherwise;
      * dropout modules follow ``train()``/``eval()``; batch norm uses its running statistics (frozen);
      * attention is normalised (:class:`fxpeft.passes.NormalizeAttention`): a mask the graph builds from
        positions alone and proves causal is dropped for ``is_causal=True``, and grouped-query K/V expanded
        by ``repeat_kv`` go to SDPA un-expanded with ``enable_gqa=True``. Outputs and gradients are the
        model's (up to float summation order); padding, sliding-window and bidirectional masks are kept;
      * a decomposed RMSNorm (HF's ``weight * (x * rsqrt(mean(x²) + eps)).to(dtype)``) becomes one
        ``aten._fused_rms_norm`` (:class:`fxpeft.passes.FuseRMSNorm`; torch's fused kernel on CUDA).

    Args:
        model: the module to capture.
        args: example positional inputs.
        kwargs: example keyword inputs.
        dynamic_shapes: passed to ``torch.export`` instead of the all-``AUTO`` default.
        strict: ``torch.export``'s strict mode (default False, which HF models need).
        leaf_modules: module classes that symbolic_trace keeps as opaque calls.
        normalize_attention: run :class:`fxpeft.passes.NormalizeAttention` on an export graph (default True);
            False keeps SDPA's calls exactly as torch.export captured them.
        fuse_rms_norm: run :class:`fxpeft.passes.FuseRMSNorm` on an export graph (default True).

    Returns:
        The graph module, sharing parameters with ``model``.

    Raises:
        TraceError: capture failed; the message says why and which route to try instead.

    Example:
        >>> import torch, fxpeft
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> gm = fxpeft.trace(mlp, (torch.randn(3, 4),))
        >>> gm(torch.randn(5, 4)).shape
        torch.Size([5, 2])
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() takes an nn.Module, got {type(model).__name__}")
    kwargs = dict(kwargs or {})
    if (args or kwargs) and "use_cache" not in kwargs and _takes_use_cache(model):
        # an HF model returns its KV cache object by default, which torch.export cannot output; training and
        # rewriting want no cache, and ``trace(..., kwargs={"use_cache": True})`` still asks for one
        kwargs["use_cache"] = False
    if dynamic_shapes is None:  # flags last (stable): they become defaults of forward, which must trail
        kwargs = dict(sorted(kwargs.items(), key=lambda kv: isinstance(kv[1], (bool, int, float, str, type(None)))))
    if args or kwargs:
        args, kwargs = _own_copies(tuple(args), kwargs)
        gm = _export(model, args, kwargs, dynamic_shapes, strict, normalize_attention, fuse_rms_norm)
        dialect = "export"
    else:
        class _Tracer(fx.Tracer):
            def is_leaf_module(self, m, qualname):
                return isinstance(m, tuple(leaf_modules)) or super().is_leaf_module(m, qualname)

        try:
            graph = _Tracer().trace(model)
        except Exception as e:
            raise TraceError(
                f"torch.fx.symbolic_trace could not capture {type(model).__name__}: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}\n"
                "Pass example inputs (fxpeft.trace(model, args, kwargs)) to use torch.export, which captures "
                "data-dependent Python and HF models, or mark the failing submodule as a leaf (leaf_modules=...).") from e
        gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")
        _own_called_modules(gm)
        dialect = "fx"
    _record(gm, model, dialect)
    if dialect == "export":
        _record_shapes(gm, args, kwargs)
    from .serialize import make_picklable  # fxpeft.serialize hook: pickle/deepcopy keep the graph, tags, GraphInfo
    gm = make_picklable(gm)
    if any(p.is_meta for p in gm.parameters()):  # traced on meta weights: running it first needs load_weights
        from .weights import guard_unloaded

        guard_unloaded(gm)
    gm.train(model.training)
    gm.graph.lint()
    return gm


@on_flat_graph  # an outlined graph (fxpeft.passes.OutlineBlocks) is inlined for the call
def rewrite(gm: fx.GraphModule, config: Any, adapter_name: str = "default", *, fuse: bool = True) -> fx.GraphModule:
    """Insert adapters into ``gm`` in place and freeze every base parameter.

    Atomic: every check runs before the graph changes, so on error ``gm`` is exactly as it was. On a graph from
    :func:`trace`, the Python code of the new graph is generated at its first use (the first call, ``gm.code``,
    ``torch.compile``, a pickle or copy), not by the rewrite: on a big graph that is most of the cost.

    Args:
        gm: a graph from :func:`trace`.
        config: :class:`fxpeft.LoraConfig`, :class:`fxpeft.IA3Config`, or another registered method's config.
        adapter_name: key of this adapter.
        fuse: fuse sibling low-rank sites (sites reading one input, e.g. q/k/v) into one dropout and one down
            matmul (:class:`fxpeft.passes.FuseLowRankSiblings`): faster, and siblings share one dropout mask.
            Parameters and saved files stay per site. ``fuse=False`` keeps one chain (and mask) per site.

    Returns:
        ``gm``, rewritten.

    Raises:
        TargetError, UnsupportedSiteError, AdapterExistsError, ConfigError: see the message for the fix.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
        >>> gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> sorted(n for n, p in gm.named_parameters() if p.requires_grad)
        ['0.lora_default.A', '0.lora_default.B']
    """
    if type(config).__module__.split(".")[0] == "peft":  # a PEFT user's own config object works as is
        config = config_from_peft(config)
    return rewrite_graph(gm, config, adapter_name, fuse=fuse)


def export(gm: nn.Module, path: str | os.PathLike, args: tuple = (), kwargs: dict | None = None, *,
           dynamic_shapes=None, strict: bool = False) -> torch.export.ExportedProgram:
    """Export ``gm`` (merged or not) to a ``.pt2`` that ``torch.export.load(path).module()`` runs without fxpeft.

    The graph is exported in eval mode (dropout off), with the same dynamic dims as :func:`trace`. The
    file is written to a temporary name in the same directory and renamed, so a crash leaves no half file.
    Forward keywords that adapters added (:mod:`fxpeft.inputs`: Poly's ``task_ids``, aLoRA's ``alora_offsets``)
    default to ``None`` here when ``kwargs`` leaves them out; the loaded program takes them as keywords too
    (``module(**inputs, alora_offsets=None)``), as ``torch.export`` fixes its calling convention.

    Example:
        >>> import torch, fxpeft, tempfile, os
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 2)), (torch.randn(3, 4),))
        >>> p = os.path.join(tempfile.mkdtemp(), "m.pt2")
        >>> _ = fxpeft.export(gm, p, (torch.randn(3, 4),))
        >>> torch.export.load(p).module()(torch.randn(7, 4)).shape
        torch.Size([7, 2])
    """
    kwargs = dict(kwargs or {})
    if isinstance(getattr(gm, "meta", {}).get(INFO_KEY), GraphInfo):
        for name in graph_info(gm).inputs:  # keywords fxpeft added default to None in the graph's forward
            kwargs.setdefault(name, None)
    was_training = gm.training
    gm.eval()
    try:
        ep = _export_program(gm, tuple(args), kwargs, dynamic_shapes, strict)
    finally:
        gm.train(was_training)
    replace_file(path, lambda tmp: torch.export.save(ep, tmp))
    return ep


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts, counted as HF PEFT counts them.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> fxpeft.get_nb_trainable_parameters(gm)
        (16, 36)
    """
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the trainable/total counts in PEFT's format.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> fxpeft.print_trainable_parameters(gm)
        trainable params: 16 || all params: 36 || trainable%: 44.4444
    """
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def adapters(gm: fx.GraphModule) -> dict[str, AdapterModule]:
    """Every adapter submodule of ``gm`` by path (found by type, never by name)."""
    from .passes.inject import adapter_modules

    return adapter_modules(gm)
