"""Call-site discovery: where a graph applies a linear, conv or embedding weight.

A *site* is one trainable weight and every graph call that applies it. It is found by pattern-matching
nodes, in both graph dialects fxpeft produces:

* **export** (``torch.export`` → ``ep.module()``): ``aten.linear/addmm/mm/matmul/conv*/convolution/embedding``
  whose weight is a ``get_attr`` parameter, with the owning module in ``node.meta["nn_module_stack"]``;
* **fx** (``torch.fx.symbolic_trace``): ``call_module`` on ``nn.Linear/Conv*/Embedding`` (and HF ``Conv1D``),
  or ``F.linear``/``F.conv*``/``F.embedding``/``@``/``torch.matmul``/``torch.addmm`` on a parameter.

Sites are named the way a PEFT user expects: by the owning module (``model.layers.0.self_attn.q_proj``) when
the weight is that module's ``weight``, otherwise by the parameter's qualified name (``blocks.0.w_qkv``).
A module called twice is one site with two calls.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .tags import get_tag, graph_info

__all__ = ["Call", "Site", "find_sites", "list_sites", "unreached_weights", "graph_dialect", "CALL_KINDS", "SITE_KINDS"]

#: the site kinds :func:`find_sites` finds by default: a weight applied by a linear, conv or embedding call
CALL_KINDS = frozenset({"linear", "conv", "embedding"})
#: every kind it can find; ``"norm"`` (a normalization module's affine weight and bias) only when asked for, by a
#: method whose ``site_kinds`` name it, so the sites other methods see do not change; ``"parameter"`` (a parameter
#: of 2 or more dims read by a ``get_attr``, adapted before all of its uses) likewise
SITE_KINDS = CALL_KINDS | {"norm", "parameter"}

aten = torch.ops.aten

# op -> (kind, input position, weight position, bias position, the layout the op expects for the weight).
# "out_in" means the op wants [out, in] (F.linear); "in_out" means [in, out] (x @ W, addmm).
_LINEAR_OPS = {
    aten.linear.default: (0, 1, 2, "out_in"),
    F.linear: (0, 1, 2, "out_in"),
    torch._C._nn.linear: (0, 1, 2, "out_in"),
    aten.addmm.default: (1, 2, 0, "in_out"),
    torch.addmm: (1, 2, 0, "in_out"),
    aten.mm.default: (0, 1, None, "in_out"),
    torch.mm: (0, 1, None, "in_out"),
    aten.matmul.default: (0, 1, None, "in_out"),
    torch.matmul: (0, 1, None, "in_out"),
    operator.matmul: (0, 1, None, "in_out"),
}
_CONV_OPS = {
    aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
    aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3,
    F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
    aten.convolution.default: None,  # dimensionality read off the weight
}
_EMBEDDING_OPS = {aten.embedding.default: (1, 0, 2), F.embedding: (0, 1, 2)}  # (indices, weight, padding_idx)
_TRANSPOSES = {aten.t.default, torch.t, aten.numpy_T.default}
# normalization op -> (input position, weight position, bias position or None)
_NORM_OPS = {aten.layer_norm.default: (0, 2, 3), aten.native_layer_norm.default: (0, 2, 3),
             aten.group_norm.default: (0, 2, 3), aten.rms_norm.default: (0, 2, None),
             aten._fused_rms_norm.default: (0, 2, None),
             F.layer_norm: (0, 2, 3), F.group_norm: (0, 2, 3), F.rms_norm: (0, 2, None),
             torch.layer_norm: (0, 2, 3), torch.group_norm: (0, 2, 3), torch.rms_norm: (0, 2, None)}
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# the elementwise ops a decomposed norm (HF ``LlamaRMSNorm``: ``weight * x``) applies its weight with
_SCALE_OPS = {aten.mul.Tensor, operator.mul, torch.mul}


@dataclass(frozen=True)
class Call:
    """One graph call that applies a site's weight.

    Attributes:
        node: the node computing the base output (``y = op(x, W, ...)``).
        input_pos: where ``x`` sits: its position in ``node.args``, or its keyword in ``node.kwargs``
            (``F.linear(input=x, weight=w)``); for an embedding, the indices.
        weight_node: the ``get_attr`` node of the weight (None for ``call_module``).
        weight_user: the node whose input is ``weight_node`` (the call itself, or a transpose of ``W``).
    """

    node: fx.Node
    input_pos: int | str
    weight_node: fx.Node | None = None
    weight_user: fx.Node | None = None

    @property
    def input(self) -> fx.Node:
        if isinstance(self.input_pos, str):
            return self.node.kwargs[self.input_pos]
        return self.node.args[self.input_pos]


@dataclass
class Site:
    """A trainable weight and the calls that apply it.

    Attributes:
        name: PEFT-style name (owning module path, or parameter path).
        kind: ``"linear"``, ``"conv"``, ``"embedding"``, or ``"norm"`` (found only when asked for).
        weight: qualified name of the weight parameter.
        bias: qualified name of the bias parameter, or None.
        in_features / out_features: for a conv, channels; for an embedding, ``num_embeddings`` / ``embedding_dim``;
            for a norm, both the number of elements of its weight.
        fan_in_fan_out: the weight is stored ``[in, out]`` (HF ``Conv1D``, ``x @ W``); PEFT's flag of that name.
        kernel_size, stride, padding, dilation, groups: conv hyper-parameters (``padding`` may be a string).
        padding_idx: embedding padding index, or None.
        module_type: class name of the owning module, or the op, for display.
        calls: every call that applies the weight.
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    fan_in_fan_out: bool = False
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] | None = None
    padding: tuple[int, ...] | str | None = None
    dilation: tuple[int, ...] | None = None
    groups: int = 1
    padding_idx: int | None = None
    module_type: str = ""
    calls: list[Call] = field(default_factory=list)
    #: a ``"parameter"`` site's full shape (its calls are the parameter's ``get_attr`` reads)
    param_shape: tuple[int, ...] = ()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "conv":
            return (self.out_features, self.in_features // self.groups, *self.kernel_size)
        if self.kind == "embedding":
            return (self.in_features, self.out_features)
        if self.kind == "norm":
            return (self.out_features,)
        if self.kind == "parameter":
            return self.param_shape
        return (self.in_features, self.out_features) if self.fan_in_fan_out else (self.out_features, self.in_features)



def graph_dialect(gm: fx.GraphModule) -> str:
    """Return ``"export"`` for an ``ep.module()``-style aten graph, ``"fx"`` for a symbolic_trace graph."""
    return graph_info(gm).dialect


def _attr(gm: fx.GraphModule, target: str):
    try:
        obj = gm
        for part in target.split("."):  # submodules straight from their table: nn.Module.__getattr__ is slow
            modules = getattr(obj, "__dict__", {}).get("_modules")
            obj = modules[part] if modules is not None and part in modules else getattr(obj, part)
        return obj
    except AttributeError:
        return None


def _see_through(arg):
    """The base value behind an adapter that replaced a call's weight (``W' = f(W)``), and the adapter node
    that reads it; ``(arg, None)`` when no adapter stands there."""
    reader = None
    while isinstance(arg, fx.Node) and (tag := get_tag(arg)) is not None and tag.replaces is not None:
        reader, arg = arg, arg.args[tag.replaces]
    return arg, reader


def _param_arg(gm: fx.GraphModule, arg) -> tuple[fx.Node, fx.Node | None, bool] | None:
    """If ``arg`` is a parameter (or its transpose), return (get_attr node, the node that reads it when that is
    not the call: a transpose, or an adapter standing in for the weight, transposed)."""
    arg, reader = _see_through(arg)
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "get_attr" and isinstance(_attr(gm, arg.target), nn.Parameter):
        return arg, reader, False
    src = None
    if arg.op == "call_function" and arg.target in _TRANSPOSES:
        src = arg.args[0]
    elif arg.op == "call_function" and arg.target in (aten.transpose.int, torch.transpose):
        if sorted(d % 2 for d in arg.args[1:3]) == [0, 1]:
            src = arg.args[0]
    elif arg.op == "call_function" and arg.target is aten.permute.default and list(arg.args[1]) == [1, 0]:
        src = arg.args[0]
    elif arg.op == "call_method" and arg.target == "t":
        src = arg.args[0]
    elif arg.op == "call_function" and arg.target is getattr and arg.args[1] in ("T", "mT"):
        src = arg.args[0]
    if isinstance(src, fx.Node) and src.op == "get_attr" and isinstance(_attr(gm, src.target), nn.Parameter):
        if _attr(gm, src.target).dim() == 2:
            return src, arg, True
    return None


def _arg(node: fx.Node, pos: int | None, name: str, default=None):
    if pos is not None and len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _input_key(node: fx.Node, pos: int, name: str) -> int | str | None:
    """Where a call's input sits: its position, or its keyword (``F.linear(input=x, weight=w)``)."""
    if len(node.args) > pos:
        return pos
    return name if isinstance(node.kwargs.get(name), fx.Node) else None


def _bias_target(gm: fx.GraphModule, bias) -> str | None:
    bias, _ = _see_through(bias)  # a trained copy standing in for the bias (fxpeft.copies)
    if isinstance(bias, fx.Node) and bias.op == "get_attr" and isinstance(_attr(gm, bias.target), nn.Parameter):
        return bias.target
    return None


def _owner(node: fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls_name.rsplit(".", 1)[-1]


def _site_name(gm: fx.GraphModule, weight: str, node: fx.Node) -> tuple[str, str]:
    """Name a site: the owning module when the weight is that module's ``weight``, else the parameter path."""
    tensor = _attr(gm, weight)
    owner = _owner(node)
    if owner is not None:
        path, cls = owner
        # Tied weights: ep.module() reaches one tensor through one name (e.g. GPT-2's embedding reads
        # ``lm_head.weight``); the module stack still knows which module made the call.
        if path and (weight == f"{path}.weight" or _attr(gm, f"{path}.weight") is tensor):
            return path, cls
    parent, _, leaf = weight.rpartition(".")
    if leaf == "weight" and parent:
        return parent, type(_attr(gm, parent)).__name__
    return weight, "Parameter"


def _conv_hparams(node: fx.Node, nd: int | None, weight: torch.Tensor):
    if node.target is aten.convolution.default:
        if node.args[6]:  # transposed convolution: not a LoRA site
            return None
        nd = weight.dim() - 2
        stride, padding, dilation, groups = node.args[3], node.args[4], node.args[5], node.args[8]
    else:
        stride = _arg(node, 3, "stride", 1)
        padding = _arg(node, 4, "padding", 0)
        dilation = _arg(node, 5, "dilation", 1)
        groups = _arg(node, 6, "groups", 1)

    def tup(v):
        return tuple(v) if isinstance(v, (list, tuple)) else (v,) * nd

    return tup(stride), (padding if isinstance(padding, str) else tup(padding)), tup(dilation), int(groups)


def _match(gm: fx.GraphModule, node: fx.Node) -> tuple[dict, Call] | None:
    """Recognise one node as a call site. Returns (site fields, call) or None."""
    if node.op == "call_module":
        mod = _attr(gm, node.target)
        w = getattr(mod, "weight", None)
        key = _input_key(node, 0, "input")
        if not isinstance(w, nn.Parameter) or key is None:
            return None
        fields = dict(name=node.target, weight=f"{node.target}.weight", module_type=type(mod).__name__,
                      bias=f"{node.target}.bias" if isinstance(getattr(mod, "bias", None), nn.Parameter) else None)
        call = Call(node, key)
        if isinstance(mod, nn.Linear):
            return dict(fields, kind="linear", in_features=w.shape[1], out_features=w.shape[0]), call
        if type(mod).__name__ == "Conv1D" and w.dim() == 2:  # HF GPT-2's transposed linear
            return dict(fields, kind="linear", in_features=w.shape[0], out_features=w.shape[1], fan_in_fan_out=True), call
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            pad = mod.padding if isinstance(mod.padding, str) else tuple(mod.padding)
            if mod.padding_mode != "zeros":
                return None  # the padded input is not what a LoRA-A conv would see
            return dict(fields, kind="conv", in_features=mod.in_channels, out_features=mod.out_channels,
                        kernel_size=tuple(mod.kernel_size), stride=tuple(mod.stride), padding=pad,
                        dilation=tuple(mod.dilation), groups=mod.groups), call
        if isinstance(mod, nn.Embedding):
            return dict(fields, kind="embedding", in_features=w.shape[0], out_features=w.shape[1],
                        padding_idx=mod.padding_idx, bias=None), call
        return None
    if node.op != "call_function":
        return None
    t = node.target
    if t in _LINEAR_OPS:
        xpos, wpos, bpos, layout = _LINEAR_OPS[t]
        if t in (aten.addmm.default, torch.addmm) and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
            return None
        p = _param_arg(gm, _arg(node, wpos, "weight"))
        key = _input_key(node, xpos, "input")
        if p is None or key is None:
            return None
        wnode, tnode, transposed = p
        w = _attr(gm, wnode.target)
        if w.dim() != 2:
            return None
        stored_in_out = (layout == "in_out") != transposed
        in_f, out_f = (w.shape[0], w.shape[1]) if stored_in_out else (w.shape[1], w.shape[0])
        bias = _bias_target(gm, _arg(node, bpos, "bias")) if bpos is not None else None
        name, cls = _site_name(gm, wnode.target, node)
        return (dict(name=name, kind="linear", weight=wnode.target, bias=bias, in_features=in_f, out_features=out_f,
                     fan_in_fan_out=stored_in_out, module_type=cls),
                Call(node, key, wnode, tnode or node))
    if t in _CONV_OPS:
        p = _param_arg(gm, _arg(node, 1, "weight"))
        key = _input_key(node, 0, "input")
        if p is None or p[2] or key is None:
            return None
        wnode = p[0]
        w = _attr(gm, wnode.target)
        hp = _conv_hparams(node, _CONV_OPS[t], w)
        if hp is None:
            return None
        stride, padding, dilation, groups = hp
        name, cls = _site_name(gm, wnode.target, node)
        return (dict(name=name, kind="conv", weight=wnode.target, bias=_bias_target(gm, _arg(node, 2, "bias")),
                     in_features=w.shape[1] * groups, out_features=w.shape[0], kernel_size=tuple(w.shape[2:]),
                     stride=stride, padding=padding, dilation=dilation, groups=groups, module_type=cls),
                Call(node, key, wnode, p[1] or node))  # p[1]: an adapter standing in for the weight
    if t in _EMBEDDING_OPS:
        ipos, wpos, ppos = _EMBEDDING_OPS[t]
        p = _param_arg(gm, _arg(node, wpos, "weight"))
        key = _input_key(node, ipos, "input" if t is F.embedding else "indices")
        if p is None or p[2] or key is None:
            return None
        wnode = p[0]
        w = _attr(gm, wnode.target)
        pad = _arg(node, ppos, "padding_idx", None)
        pad = None if pad is None or pad == -1 and t is aten.embedding.default else pad
        name, cls = _site_name(gm, wnode.target, node)
        return (dict(name=name, kind="embedding", weight=wnode.target, bias=None, in_features=w.shape[0],
                     out_features=w.shape[1], padding_idx=pad, module_type=cls),
                Call(node, key, wnode, p[1] or node))  # p[1]: an adapter standing in for the weight
    return None


def _param_node(gm: fx.GraphModule, arg) -> tuple[fx.Node, fx.Node | None] | None:
    """``(get_attr node, the adapter node standing in for it or None)`` if ``arg`` reads a parameter."""
    arg, reader = _see_through(arg)
    if isinstance(arg, fx.Node) and arg.op == "get_attr" and isinstance(_attr(gm, arg.target), nn.Parameter):
        return arg, reader
    return None


def _match_norm(gm: fx.GraphModule, node: fx.Node, normalizers: set[str]) -> tuple[dict, Call] | None:
    """Recognise a normalization's affine weight: ``call_module`` on ``nn.LayerNorm/GroupNorm/RMSNorm``, a
    ``layer_norm/group_norm/rms_norm`` op reading a parameter, or a decomposed norm: ``weight * x`` inside a module
    (``normalizers``: the modules whose own nodes compute an ``rsqrt``) that owns that one parameter only."""
    if node.op == "call_module":
        mod = _attr(gm, node.target)
        w = getattr(mod, "weight", None)
        key = _input_key(node, 0, "input")
        if not isinstance(mod, _NORM_MODULES) or not isinstance(w, nn.Parameter) or w.dim() != 1 or key is None:
            return None
        bias = f"{node.target}.bias" if isinstance(getattr(mod, "bias", None), nn.Parameter) else None
        return (dict(name=node.target, kind="norm", weight=f"{node.target}.weight", bias=bias, in_features=w.numel(),
                     out_features=w.numel(), module_type=type(mod).__name__), Call(node, key))
    if node.op != "call_function":
        return None
    if node.target in _NORM_OPS:
        xpos, wpos, bpos = _NORM_OPS[node.target]
        p = _param_node(gm, _arg(node, wpos, "weight"))
        key = _input_key(node, xpos, "input")
        bias = _bias_target(gm, _arg(node, bpos, "bias")) if bpos is not None else None
    elif node.target in _SCALE_OPS and len(node.args) == 2:
        found = [(i, p) for i, a in enumerate(node.args) if (p := _param_node(gm, a)) is not None]
        owner = _owner(node)
        if len(found) != 1 or owner is None or owner[0] not in normalizers:
            return None
        (wpos, p), bias = found[0], None
        key = 1 - wpos  # the other operand is the normalized input
        mod = _attr(gm, owner[0])
        own = [n for n, t in getattr(mod, "_parameters", {}).items() if t is not None]  # adapters hang below it
        if p[0].target != f"{owner[0]}.weight" or own != ["weight"]:
            return None
    else:
        return None
    if p is None or key is None or _attr(gm, p[0].target).dim() != 1:
        return None
    wnode, reader = p
    name, cls = _site_name(gm, wnode.target, node)
    n = _attr(gm, wnode.target).numel()
    return (dict(name=name, kind="norm", weight=wnode.target, bias=bias, in_features=n, out_features=n,
                 module_type=cls), Call(node, key, wnode, reader or node))


def _normalizers(gm: fx.GraphModule) -> set[str]:
    """The modules whose own nodes compute a reciprocal square root: the owners of decomposed norms."""
    return {o[0] for n in gm.graph.nodes if n.op == "call_function" and n.target in (aten.rsqrt.default, torch.rsqrt)
            and get_tag(n) is None and (o := _owner(n)) is not None}


def find_sites(gm: fx.GraphModule, kinds: frozenset[str] | set[str] = CALL_KINDS) -> dict[str, Site]:
    """Find every targetable call site of a graph, in graph order.

    Nodes fxpeft inserted (tagged in ``node.meta["fxpeft"]``) are never sites themselves.

    Args:
        gm: a graph from :func:`fxpeft.trace` (either dialect) or any ``torch.fx.GraphModule``.
        kinds: the site kinds to find (default :data:`CALL_KINDS`); ``"norm"`` adds normalization modules
            (a method adapting them names it in its ``site_kinds``).

    Returns:
        A dict from site name to :class:`Site`.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
        >>> list(fxpeft.find_sites(gm))
        ['0', '2']
    """
    sites: dict[str, Site] = {}
    normalizers = _normalizers(gm) if "norm" in kinds else set()
    for node in gm.graph.nodes:
        if get_tag(node) is not None:
            continue
        m = _match(gm, node)
        if m is None and "norm" in kinds:
            m = _match_norm(gm, node, normalizers)
        if m is None or m[0]["kind"] not in kinds:
            continue
        fields, call = m
        name = fields["name"]
        site = sites.get(name)
        if site is not None and (site.weight != fields["weight"] or site.kind != fields["kind"]):
            # One module path applying two different weights/kinds: keep them apart, never merge them.
            name = fields["name"] = f"{name}:{fields['kind']}" if site.kind != fields["kind"] else fields["weight"]
            site = sites.get(name)
        if site is None:
            site = sites[name] = Site(**fields)
        site.calls.append(call)
    if "parameter" in kinds:  # after the call sites, so that a name both could take stays the call site's
        _parameter_sites(gm, sites)
    return sites


def _parameter_sites(gm: fx.GraphModule, sites: dict[str, Site]) -> None:
    """Add a ``"parameter"`` site per parameter the graph reads with ``get_attr``: an adapter there rewrites the
    parameter's value before every use, whatever ops read it (grouped_mm, bmm, slices, views, indexing).

    Named by the parameter's path (``<path>:parameter`` if a call site already has that name). In/out follow PEFT's
    ``ParamWrapper``: a 2-D ``[out, in]``; a 3-D ``[experts, out, in]``, or ``[experts, in, out]`` when the owning
    module says ``is_transposed`` (``fan_in_fan_out`` then). A conv's weight ``[out, in, *k]`` (its module a conv, or
    marked ``is_conv`` by :func:`fxpeft.trace`) is seen as conv LoRA sees it: ``[out, in·k]``, ``kernel_size`` set."""
    for node in gm.graph.nodes:
        if node.op != "get_attr" or get_tag(node) is not None or not node.users:
            continue
        p = _attr(gm, node.target)
        if not isinstance(p, nn.Parameter):
            continue
        # after a rewrite the parameter's one reader is the adapter node standing for it (the merge's own reader)
        only = next(iter(node.users)) if len(node.users) == 1 else None
        user = only if only is not None and (t := get_tag(only)) is not None and t.replaces is not None else None
        call = Call(node, 0, node, user)
        # a parameter site is named by its weight (``:parameter`` added on a clash): two lookups, not a scan
        hit = next((s for s in (sites.get(node.target), sites.get(f"{node.target}:parameter"))
                    if s is not None and s.kind == "parameter" and s.weight == node.target), None)
        if hit is not None:
            hit.calls.append(call)
            continue
        parent = node.target.rpartition(".")[0]
        owner = _attr(gm, parent) if parent else gm
        transposed = p.dim() == 3 and bool(getattr(owner, "is_transposed", False))
        shape = tuple(p.shape)
        # a conv's weight read directly (Mamba's depthwise conv1d): its update uses conv LoRA's (out, in·k) view
        conv = p.dim() >= 3 and (isinstance(owner, nn.modules.conv._ConvNd) or getattr(owner, "is_conv", False) is True)
        if conv:
            out_f, in_f = shape[0], math.prod(shape[1:])
        elif p.dim() == 3:
            out_f, in_f = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
        else:  # 1-D (refused by the method) or 2-D [out, in]
            out_f, in_f = shape[0] if shape else 1, shape[1] if p.dim() >= 2 else 1
        name = node.target if node.target not in sites else f"{node.target}:parameter"
        sites[name] = Site(name=name, kind="parameter", weight=node.target, bias=None, in_features=in_f,
                           out_features=out_f, fan_in_fan_out=transposed, module_type=_reader_class(node), calls=[call],
                           param_shape=shape, kernel_size=shape[2:] if conv else ())


def _reader_class(node: fx.Node) -> str:
    """The class of the module whose code reads a parameter (``MultiheadAttention`` for its ``in_proj_weight``, which
    no module call of its own applies), past any adapter standing for it; ``"Parameter"`` when none owns it."""
    user = next(iter(node.users), None)
    while user is not None and (t := get_tag(user)) is not None and t.replaces is not None:
        user = next(iter(user.users), None)
    owner = _owner(user) if user is not None else None
    if owner is not None and owner[0] and node.target.startswith(owner[0] + "."):
        return owner[1]
    return "Parameter"


def _op_label(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return f"{node.op} {node.target}"


def unreached_weights(gm: fx.GraphModule, sites: dict[str, Site] | None = None) -> dict[str, str]:
    """Parameters that the graph uses, but not as the weight of a site, with why no site reaches them.

    Examples: a weight read through a view or a slice (a cross-attention ``in_proj`` slice), on the left of a
    matmul or in an einsum (Mamba's ``dt_proj`` slow path), through a permute, a table read by an add (a
    positional embedding), or anything inside a module that the graph calls as one opaque ``call_module``.

    Example:
        >>> import torch, fxpeft
        >>> class M(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.w = torch.nn.Parameter(torch.randn(4, 4))
        ...     def forward(self, x):
        ...         return self.w @ x
        >>> fxpeft.sites.unreached_weights(fxpeft.trace(M()))
        {'w': 'read by matmul (on the left, or as a plain operand): not the weight of a linear/conv/embedding call'}
    """
    sites = find_sites(gm) if sites is None else {n: s for n, s in sites.items() if s.kind != "parameter"}
    reached = {s.weight for s in sites.values()} | {s.bias for s in sites.values() if s.bias}
    reached_ids = {id(_attr(gm, w)) for w in reached}
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if get_tag(node) is not None:
            continue
        if node.op == "get_attr":
            t = _attr(gm, node.target)
            if isinstance(t, nn.Parameter) and id(t) not in reached_ids and node.users:
                ops = sorted({_op_label(u) for u in node.users})
                how = "through " + ", ".join(ops) if all(_op_label(u) in _VIEW_LIKE for u in node.users) else \
                    "by " + ", ".join(ops) + " (on the left, or as a plain operand)"
                out.setdefault(node.target, f"read {how}: not the weight of a linear/conv/embedding call")
        elif node.op == "call_module" and node.target not in sites:
            mod = _attr(gm, node.target)
            for name, p in (mod.named_parameters() if isinstance(mod, nn.Module) else ()):
                if id(p) not in reached_ids:
                    out.setdefault(f"{node.target}.{name}", f"applied inside {type(mod).__name__} {node.target!r}, "
                                   "which the graph calls as one opaque module; trace with example inputs to see inside")
    return out


_VIEW_LIKE = {"view", "reshape", "slice", "select", "permute", "transpose", "t", "squeeze", "unsqueeze", "expand",
              "narrow", "getitem", "__getitem__", "flatten", "unflatten", "as_strided", "split", "chunk", "unbind",
              "call_method view", "call_method reshape", "call_method permute", "call_method squeeze",
              "call_method unsqueeze", "call_method t", "call_method transpose", "call_method narrow"}


def list_sites(gm: fx.GraphModule, *, with_unreached: bool = False):
    """The targetable sites of a graph: the answer to "what do I put in ``target_modules``?".

    Args:
        gm: a traced graph.
        with_unreached: also return :func:`unreached_weights`: parameters no site reaches, and why.

    Returns:
        The sites; with ``with_unreached``, ``(sites, {parameter: why})``.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 8)))
        >>> [(s.name, s.kind, s.weight_shape) for s in fxpeft.list_sites(gm)]
        [('0', 'linear', (8, 4))]
    """
    sites = find_sites(gm)
    return (list(sites.values()), unreached_weights(gm, sites)) if with_unreached else list(sites.values())
