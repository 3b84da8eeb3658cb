"""Fuse the decomposed RMSNorm that torch.export leaves in HF graphs into one ``aten._fused_rms_norm``.

An export graph spells HF's ``LlamaRMSNorm`` (and Mistral's, Qwen's, ...) as six ops::

    h = x.to(float32);  v = h.pow(2).mean(-1, keepdim=True);  n = h * rsqrt(v + eps);  y = w * n.to(dtype)

Eager runs them one by one from Python. ``aten._fused_rms_norm`` is one call: on CUDA it is torch's fused kernel
(one pass forward, only ``h`` and the per-row ``rstd`` saved for backward); on a CPU build it is a C++ composite of
the same ops (the same saved tensors, six Python-level calls fewer per norm). The pass proves the pattern from the
graph (op, reduced dim, the intermediates used by nothing else) and replaces the normalisation part; the weight
joins the fused op only where the cast between them is the identity (an fp32 norm), so a bf16 model keeps HF's
rounding (normalise in fp32, cast, multiply in the model's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from .transaction import transaction

__all__ = ["FuseRMSNorm"]

aten = torch.ops.aten
_TO = {aten.to.dtype, aten._to_copy.default}
_FUSED = aten._fused_rms_norm.default
_ASSERT = aten._assert_tensor_metadata.default  # export's dtype checks on intermediates: they go with them


def _val(a: Any) -> Any:
    return a.meta.get("val") if isinstance(a, fx.Node) else None


def _checks(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.op == "call_function" and u.target is _ASSERT]


def _only_user(node: fx.Node, target) -> fx.Node | None:
    """``node``'s single user besides dtype checks if it calls ``target`` (a callable or a set of them), else None."""
    users = [u for u in node.users if not (u.op == "call_function" and u.target is _ASSERT)]
    if len(users) != 1:
        return None
    (user,) = users
    targets = target if isinstance(target, (set, frozenset)) else {target}
    return user if user.op == "call_function" and user.target in targets else None


def _cast_dtype(node: fx.Node) -> torch.dtype | None:
    """The dtype a ``to``/``_to_copy`` casts to, if it changes nothing but the dtype."""
    if node.target is aten.to.dtype:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    if set(node.kwargs) <= {"dtype"} and len(node.args) == 1:
        return node.kwargs.get("dtype")
    return None


@dataclass
class _Match:
    h: fx.Node          # the normalised input (fp32)
    eps: float
    n: fx.Node          # h * rsqrt(mean(h²) + eps)
    out: fx.Node        # the last node replaced
    weight: fx.Node | None  # folded into the fused op (fp32 case) or None
    dead: list[fx.Node]


def _scale_weight(n: fx.Node, hidden: int) -> tuple[fx.Node | None, fx.Node, list[fx.Node]]:
    """Past ``n``: an identity cast then ``w * n`` with a ``[hidden]`` weight of ``n``'s dtype → (w, mul, [cast])."""
    nv, nxt, casts = _val(n), n, []
    cast = _only_user(n, _TO)
    if cast is not None:
        if _cast_dtype(cast) != nv.dtype:  # a real cast (bf16 model): keep it and the weight product outside
            return None, n, []
        nxt, casts = cast, [cast]
    mul = _only_user(nxt, aten.mul.Tensor)
    if mul is None or len(mul.args) != 2:
        return None, n, []
    w = mul.args[0] if mul.args[1] is nxt else mul.args[1]
    wv = _val(w)
    ok = (isinstance(w, fx.Node) and w is not nxt and isinstance(wv, torch.Tensor) and tuple(wv.shape) == (hidden,)
          and wv.dtype == nv.dtype and tuple(_val(mul).shape) == tuple(nv.shape))
    return (w, mul, casts) if ok else (None, n, [])


def _match(rsqrt: fx.Node) -> _Match | None:
    """Walk out from an ``rsqrt`` to the RMSNorm around it; None unless every step is proved."""
    add = rsqrt.args[0]
    if not (isinstance(add, fx.Node) and add.target is aten.add.Tensor and len(add.users) == 1
            and isinstance(add.args[1], float)):
        return None
    mean = add.args[0]
    if not (isinstance(mean, fx.Node) and mean.target is aten.mean.dim and len(mean.users) == 1):
        return None
    dims, keep = mean.args[1], (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
    pw = mean.args[0]
    if not (keep and isinstance(pw, fx.Node) and pw.target is aten.pow.Tensor_Scalar and pw.args[1] == 2
            and len(pw.users) == 1 and mean.kwargs.get("dtype") is None):
        return None
    h, hv = pw.args[0], _val(pw.args[0])
    if not isinstance(hv, torch.Tensor) or hv.dtype != torch.float32 or list(dims) not in ([-1], [hv.dim() - 1]):
        return None
    n = _only_user(rsqrt, aten.mul.Tensor)
    if n is None or set(n.args) != {h, rsqrt} or tuple(_val(n).shape) != tuple(hv.shape):
        return None
    hidden = hv.shape[-1]
    if not isinstance(hidden, int):  # the normalised size must be static for the fused op's shape argument
        return None
    w, out, casts = _scale_weight(n, hidden)
    return _Match(h, float(add.args[1]), n, out, w, [pw, mean, add, rsqrt, n, *casts] + ([out] if w is not None
                                                                                         else []))


@dataclass(frozen=True)
class FuseRMSNorm:
    """Replace each proved decomposed RMSNorm with ``aten._fused_rms_norm`` (fp32 outputs equal; runs in ``trace``).

    Idempotent: a fused graph has no ``rsqrt`` left to match. Where the norm's weight multiplies an fp32 result
    it joins the fused op; the norm then is a site :func:`fxpeft.sites.find_sites` reports with ``kinds={"norm"}``
    (LN tuning adapts its weight as before).

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes import FuseRMSNorm
        >>> from fxpeft.zoo import tiny_llama
        >>> model, args, kwargs = tiny_llama(layers=1)
        >>> gm = fxpeft.trace(model, args, kwargs, fuse_rms_norm=False)
        >>> FuseRMSNorm()(gm).modified, FuseRMSNorm()(gm).modified
        (True, False)
        >>> sum(n.target is torch.ops.aten._fused_rms_norm.default for n in gm.graph.nodes)
        3
        >>> torch.allclose(gm(*args, **kwargs).logits, model(*args, **kwargs).logits, rtol=0, atol=1e-6)
        True
    """

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        matches = [m for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.rsqrt.default
                   for m in [_match(n)] if m is not None]
        if not matches:
            return PassResult(gm, False)
        with transaction(gm):  # ---- every match proved: mutate from here on, all or nothing ----
            graph = gm.graph
            for m in matches:
                with graph.inserting_after(m.out):
                    # [..., H] → ([..., H] normalised (× weight), [..., 1] rstd): only the first is used
                    fused = graph.call_function(_FUSED, (m.h, [_val(m.h).shape[-1]], m.weight, m.eps))
                with graph.inserting_after(fused):
                    y = graph.call_function(operator.getitem, (fused, 0))
                for node, src in ((fused, m.n), (y, m.out)):
                    node.meta.update({k: v for k, v in src.meta.items() if k in ("nn_module_stack", "stack_trace",
                                                                                  "source_fn_stack", "val")})
                fused.meta.pop("val", None)
                m.out.replace_all_uses_with(y, delete_user_cb=lambda u: u is not y)
                for node in reversed(m.dead):
                    for check in _checks(node):
                        graph.erase_node(check)
                    graph.erase_node(node)
            graph.lint()
            gm.recompile()
        return PassResult(gm, True)
