"""Attention normalisation: drop a provably causal mask, and give SDPA grouped K/V un-expanded.

A transformers model captured by ``torch.export`` computes its attention mask inside the graph, and repeats
grouped-query K/V to the query heads before attention. Against eager HF that costs twice:

* ``aten.scaled_dot_product_attention`` gets a materialised ``[B, 1, T, T]`` boolean mask, built every call
  from position aranges, where eager HF (no padding) passes ``is_causal=True`` and the kernel skips the
  masked blocks;
* ``repeat_kv`` (``k[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D)``) copies K and V ``n``
  times, forward and backward, where SDPA's ``enable_gqa=True`` reads the grouped heads in place.

:class:`NormalizeAttention` rewrites each only where it proves the result equal:

1. **Causal mask.** :class:`_MaskAlgebra` computes the mask's value symbolically, element by element: a sympy
   expression of the element's indices ``(i0, i1, ...)`` and the graph's size symbols, built op by op from
   the mask's ancestry (aranges, comparisons, broadcasting, indexing, logical ops; see ``_RULES``). Every
   other value (a placeholder such as ``attention_mask``, a parameter or buffer, an op it does not model)
   is unknown, and a mask that depends on one is kept. The mask is dropped for ``is_causal=True`` when
   its value is ``True`` (a float mask: ``0``) at every ``key <= query`` and ``False`` (``-inf``) at every
   ``key > query``, for every size the graph accepts (the symbols stay symbols), and its last two dims are
   the query and key lengths, provably one symbol. torch's ``is_causal`` is the top-left ``tril`` mask,
   ``key <= query``; with equal lengths it is also HF's bottom-right one, so the rewrite is exact.
   Sliding windows (``query - key < W``), bidirectional (BERT) and padding masks fail the proof and stay.
2. **Grouped K/V.** ``reshape(expand(unsqueeze(k, 2), [B, Hkv, n, S, D]), [B, Hkv * n, S, D])`` gives query
   head ``h`` the KV head ``h // n``, which is what SDPA's ``enable_gqa=True`` reads (its reference
   implementation is ``repeat_interleave(n, dim=-3)``). Rewritten only when both K and V have the pattern
   with the same ``n``, and when the SDPA dispatcher, asked with tensors like the graph's, still picks a
   fused kernel for the grouped call (on CUDA the memory-efficient kernel has no GQA: a masked or fp32
   call would fall back to the math kernel; on CPU the flash kernel takes GQA, masked or not).

transformers 5's sdpa path already gives SDPA a *boolean* mask with padding (``causal & attention_mask[b,
key]``), so there is no float additive mask to replace: a padded graph keeps its mask and gets rewrite 2.

Export graphs only (aten ops); a ``symbolic_trace`` graph has no aten SDPA and is left as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.infra.pass_base import PassResult

from .transaction import transaction

__all__ = ["NormalizeAttention"]

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_ASSERT_META = aten._assert_tensor_metadata.default
_RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
#: element index symbols: ``_IDX[k]`` is the index along dim ``k`` of the tensor whose value an expression is
_IDX = tuple(sympy.Symbol(f"_idx{k}", integer=True, nonnegative=True) for k in range(12))
_MATH = int(torch.nn.attention.SDPBackend.MATH)


# ------------------------------------------------------------------------------------------------ helpers

def _val(a: Any) -> Any:
    return a.meta.get("val") if isinstance(a, fx.Node) else None


def _tensor(a: Any) -> torch.Tensor | None:
    v = _val(a)
    return v if isinstance(v, torch.Tensor) else None


def _same(a, b) -> bool:
    """``a == b`` for every size the graph accepts (never guesses: an unprovable equality is False)."""
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # a size torch cannot compare without a guard
        return False


def _is_one(size) -> bool:
    return _same(size, 1)


def _number(v: float) -> sympy.Expr | None:
    """A Python number as an exact sympy number (floats by their exact binary value); None for NaN."""
    if isinstance(v, bool):
        return sympy.Integer(int(v))
    if isinstance(v, int):
        return sympy.Integer(v)
    if math.isnan(v):
        return None
    return sympy.oo if v == math.inf else -sympy.oo if v == -math.inf else sympy.Rational(v)


def _scalar(a: Any) -> sympy.Basic | None:
    """The value of a non-tensor argument: a Python number, a SymInt, or a node holding one."""
    if isinstance(a, fx.Node):
        a = _val(a)
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return sympy.sympify(a.node.expr)
    if isinstance(a, (bool, int, float)):
        return _number(a)
    return None


def _as_number(e: sympy.Basic, is_bool: bool) -> sympy.Basic:
    if not is_bool:
        return e
    return sympy.Piecewise((1, e), (0, True)) if e not in (sympy.true, sympy.false) else sympy.Integer(int(bool(e)))


def _as_bool(e: sympy.Basic, is_bool: bool) -> sympy.Basic:
    return e if is_bool else sympy.Ne(e, 0)


def _broadcast(e: sympy.Basic, shape, out_shape) -> sympy.Basic | None:
    """``e`` (over a tensor of ``shape``) read at the indices of ``out_shape`` it broadcasts to (right-aligned)."""
    off = len(out_shape) - len(shape)
    if off < 0:
        return None
    sub = {}
    for k, size in enumerate(shape):
        if _same(size, out_shape[k + off]):
            sub[_IDX[k]] = _IDX[k + off]
        elif _is_one(size):
            sub[_IDX[k]] = sympy.Integer(0)
        else:  # a dim that may or may not broadcast: unknown
            return None
    return e.xreplace(sub)


def _pin_unit_dims(e: sympy.Basic, shape) -> sympy.Basic:
    """The only index along a size-1 dim is 0: substituting it lets later ops see constants."""
    return e.xreplace({_IDX[k]: sympy.Integer(0) for k, s in enumerate(shape) if _is_one(s)})


def _args(node: fx.Node, defaults: tuple) -> list:
    """``node.args`` padded with the op's defaults for the trailing positional arguments it leaves out."""
    return list(node.args) + list(defaults[len(node.args):])


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# ------------------------------------------------------------------------------------------ mask algebra

class _MaskAlgebra:
    """Element values of tensor nodes, as sympy expressions of their indices ``_IDX[k]`` and size symbols.

    A node of dtype bool has a sympy boolean; any other dtype a number (``-oo`` / ``oo`` for infinities).
    Values are exact: float arithmetic (which rounds) is not modelled, only exact float constants, selections
    and comparisons. ``value`` is None for anything not modelled, and for everything that depends on it.
    """

    def __init__(self) -> None:
        self.memo: dict[fx.Node, sympy.Basic | None] = {}

    def value(self, node: fx.Node) -> sympy.Basic | None:
        if node in self.memo:
            return self.memo[node]
        self.memo[node] = None  # an op reached again while it is being computed (there is none in a DAG)
        val, rule = _tensor(node), _RULES.get(node.target) if node.op == "call_function" else None
        expr = None
        if rule is not None and val is not None and val.dim() <= len(_IDX):
            try:
                expr = rule(self, node)
            except Exception:  # sympy or shape arithmetic that does not apply: the value is unknown, kept as is
                expr = None
            if expr is not None:
                expr = _pin_unit_dims(expr, val.shape)
        self.memo[node] = expr
        return expr

    def operand(self, a: Any, out_shape, *, as_bool: bool) -> sympy.Basic | None:
        """Argument ``a`` of an elementwise op, at the op's output indices, as a boolean or as a number."""
        t = _tensor(a)
        if t is None:
            e = _scalar(a)
            is_bool = isinstance(a, bool) or isinstance(_val(a), torch.SymBool)
        else:
            e = self.value(a)
            e = None if e is None else _broadcast(e, t.shape, out_shape)
            is_bool = t.dtype == torch.bool
        if e is None:
            return None
        return _as_bool(e, is_bool) if as_bool else _as_number(e, is_bool)


def _out(node: fx.Node) -> torch.Tensor:
    return node.meta["val"]


def _is_int(dtype: torch.dtype) -> bool:
    return dtype != torch.bool and not dtype.is_floating_point and not dtype.is_complex


def _exact_in(v: Any, dtype: torch.dtype) -> bool:
    """A Python number converts to ``dtype`` without rounding (``torch`` casts scalars to the compute dtype)."""
    try:
        return float(torch.tensor(v, dtype=dtype).item()) == float(v)
    except (TypeError, RuntimeError, OverflowError):
        return False


def _compute_dtype(args: tuple) -> torch.dtype | None:
    """The dtype torch computes an elementwise op of ``args`` in, when every argument converts to it exactly.

    Strict on purpose: bools go anywhere, integers widen into integers; an integer tensor meeting a float
    (which would round its large values) or a float scalar the dtype rounds gives None (not modelled).
    """
    dtypes = [t.dtype for t in map(_tensor, args) if t is not None]
    if not dtypes:
        return None
    dtype = dtypes[0]
    for d in dtypes[1:]:
        if dtype == torch.bool or d == torch.bool or _is_int(d) and _is_int(dtype):
            dtype = torch.promote_types(dtype, d)
        elif d != dtype:
            return None
    for a in args:
        v = a if not isinstance(a, fx.Node) else _val(a)
        if isinstance(v, torch.Tensor) or isinstance(v, bool):
            continue
        if isinstance(v, torch.SymInt) or isinstance(v, int) and not dtype.is_floating_point:
            dtype = torch.int64 if dtype == torch.bool else dtype
            if not _is_int(dtype):
                return None
        elif isinstance(v, (int, float)):
            dtype = torch.get_default_dtype() if dtype == torch.bool else dtype  # bool tensor, float scalar
            if not dtype.is_floating_point or not _exact_in(v, dtype):
                return None
        else:
            return None
    return dtype


def _arith(fn: Callable[..., sympy.Basic]) -> Callable:
    """Integer arithmetic, exact at index magnitudes; float arithmetic rounds and is not modelled."""
    def rule(alg: _MaskAlgebra, node: fx.Node):
        operands = node.args[:2]
        alpha = node.args[2] if len(node.args) > 2 else node.kwargs.get("alpha", 1)
        if not _is_int(_out(node).dtype) or _compute_dtype((*operands, alpha)) is None:
            return None
        ops = [alg.operand(a, _out(node).shape, as_bool=False) for a in operands]
        alpha = _scalar(alpha)
        return None if alpha is None or any(o is None for o in ops) else fn(*ops, alpha)
    return rule


def _compare(rel: Callable[..., sympy.Basic]) -> Callable:
    def rule(alg: _MaskAlgebra, node: fx.Node):
        if _compute_dtype(node.args[:2]) is None:
            return None
        a, b = (alg.operand(x, _out(node).shape, as_bool=False) for x in node.args[:2])
        return None if a is None or b is None else rel(a, b)
    return rule


def _logical(fn: Callable[..., sympy.Basic]) -> Callable:
    """Logical ops, and bitwise ones on bools (bitwise ops on integers are not logical: not modelled)."""
    def rule(alg: _MaskAlgebra, node: fx.Node):
        if _out(node).dtype != torch.bool:
            return None
        ops = [alg.operand(x, _out(node).shape, as_bool=True) for x in node.args]
        return None if any(o is None for o in ops) else fn(*ops)
    return rule


def _select(alg: _MaskAlgebra, node: fx.Node, cond: Any, yes: Any, no: Any):
    """``where(cond, yes, no)``, also ``masked_fill`` (whose fill converts to the output's dtype)."""
    shape, is_bool = _out(node).shape, _out(node).dtype == torch.bool
    if _compute_dtype((yes, no)) != _out(node).dtype:
        return None
    c = alg.operand(cond, shape, as_bool=True)
    a, b = (alg.operand(x, shape, as_bool=is_bool) for x in (yes, no))
    if c is None or a is None or b is None:
        return None
    return sympy.Or(sympy.And(c, a), sympy.And(sympy.Not(c), b)) if is_bool else sympy.Piecewise((a, c), (b, True))


def _convert(alg: _MaskAlgebra, node: fx.Node):
    """A dtype conversion (``to``, ``_to_copy``, ``clone``...): kept only where it cannot change a value."""
    src = _tensor(node.args[0])
    e = alg.value(node.args[0]) if src is not None else None
    if e is None:
        return None
    a, b = src.dtype, _out(node).dtype
    if b == torch.bool:
        return _as_bool(e, a == torch.bool)
    if a == torch.bool:
        return _as_number(e, True)
    widening = (_is_int(a) and _is_int(b) or a.is_floating_point and b.is_floating_point) and b.itemsize >= a.itemsize
    return e if a == b or widening else None  # int -> float, narrowing: not exact for every value


def _constant(fill: Callable[[fx.Node], Any]) -> Callable:
    """``full``, ``ones``, ``new_zeros``...: ``fill(node)`` is the fill value (exact in the dtype, or unknown)."""
    def rule(alg: _MaskAlgebra, node: fx.Node):
        v, dtype = fill(node), _out(node).dtype
        if not isinstance(v, (bool, int, float)):  # a SymInt fill (a size): not modelled
            return None
        if dtype == torch.bool:
            return sympy.true if v else sympy.false
        return _number(v) if _exact_in(v, dtype) else None
    return rule


def _arange(alg: _MaskAlgebra, node: fx.Node):
    if not _is_int(_out(node).dtype):
        return None
    args = list(node.args)
    start, step = (args[0], args[2] if len(args) > 2 else 1) if len(args) >= 2 else (0, 1)
    start, step = _scalar(start), _scalar(step)
    if start is None or step is None or not (start.is_integer and step.is_integer):
        return None  # a float start or step is computed in double, then cast: not modelled
    return start + _IDX[0] * step


def _unsqueeze(alg: _MaskAlgebra, node: fx.Node):
    e, dim = alg.value(node.args[0]), _dim(node.args[1], _out(node).dim())
    return None if e is None else e.xreplace({_IDX[k]: _IDX[k + 1] for k in range(dim, len(_IDX) - 1)})


def _expand(alg: _MaskAlgebra, node: fx.Node):
    e = alg.value(node.args[0])
    return None if e is None else _broadcast(e, _out(node.args[0]).shape, _out(node).shape)


def _slice(alg: _MaskAlgebra, node: fx.Node):
    x, dim, start, _end, step = _args(node, (None, 0, None, None, 1))
    e, dim = alg.value(x), _dim(dim, _out(node).dim())
    start, step = _scalar(0 if start is None else start), _scalar(step)
    if e is None or start is None or step is None or not (start.is_nonnegative and step.is_positive):
        return None  # a negative start counts from the end: not modelled
    return e.xreplace({_IDX[dim]: start + _IDX[dim] * step})


def _select_int(alg: _MaskAlgebra, node: fx.Node):
    x, dim, index = node.args
    e, dim, index = alg.value(x), _dim(dim, _out(x).dim()), _scalar(index)
    if e is None or index is None or not index.is_nonnegative:
        return None
    return e.xreplace({_IDX[k]: (index if k == dim else _IDX[k - 1]) for k in range(dim, _out(x).dim())})


def _permute(alg: _MaskAlgebra, node: fx.Node):
    e, rank = alg.value(node.args[0]), _out(node).dim()
    if e is None:
        return None
    if node.target is aten.transpose.int:
        a, b = _dim(node.args[1], rank), _dim(node.args[2], rank)
        order = list(range(rank))
        order[a], order[b] = order[b], order[a]
    else:
        order = [_dim(d, rank) for d in node.args[1]]
    return e.xreplace({_IDX[src]: _IDX[k] for k, src in enumerate(order)})  # output dim k is input dim order[k]


def _index(alg: _MaskAlgebra, node: fx.Node):
    """``x[idx0, idx1, ...]`` with integer index tensors for the leading dims (advanced indexing)."""
    x, indices = node.args
    e, xs, out = alg.value(x), _out(x).shape, _out(node).shape
    if e is None or not indices or any(_tensor(i) is None or not _is_int(_tensor(i).dtype) for i in indices):
        return None
    m = len(out) - (len(xs) - len(indices))  # rank of the broadcast index tensors, which lead the output
    sub = {}
    for k, i in enumerate(indices):
        v = alg.value(i)
        v = None if v is None else _broadcast(v, _tensor(i).shape, out[:m])
        if v is None or not v.is_nonnegative:  # a negative index counts from the end: not modelled
            return None
        sub[_IDX[k]] = v
    for k in range(len(indices), len(xs)):
        sub[_IDX[k]] = _IDX[m + k - len(indices)]
    return e.xreplace(sub)


def _diff(alg: _MaskAlgebra, node: fx.Node):
    """``diff(x, 1, dim, prepend)``: ``c[d + 1] - c[d]`` over ``c = cat(prepend, x)``, prepend of size 0 or 1."""
    x, n, dim, prepend, append = _args(node, (None, 1, -1, None, None))
    e, dim = alg.value(x), _dim(dim, _out(x).dim())
    if e is None or n != 1 or append is not None or not _is_int(_out(node).dtype):
        return None
    d = _IDX[dim]
    if prepend is None:
        return e.xreplace({d: d + 1}) - e
    p = alg.value(prepend)
    if p is None or not _is_one(_out(prepend).shape[dim]):
        return None
    first = e.xreplace({d: 0}) - p.xreplace({d: 0})  # x[0] - prepend[0]
    return sympy.Piecewise((first, sympy.Eq(d, 0)), (e - e.xreplace({d: d - 1}), True))


def _cumsum(alg: _MaskAlgebra, node: fx.Node):
    """The cumulative sum of a value constant along ``dim``: ``value * (index + 1)``."""
    x, dim = node.args[:2]
    e, dim = alg.value(x), _dim(dim, _out(x).dim())
    if e is None or not _is_int(_out(node).dtype) or _IDX[dim] in e.free_symbols:
        return None
    return _as_number(e, _out(x).dtype == torch.bool) * (_IDX[dim] + 1)


def _triangle(lower: bool) -> Callable:
    def rule(alg: _MaskAlgebra, node: fx.Node):
        x, diagonal = _args(node, (None, 0))
        e, rank = alg.value(x), _out(node).dim()
        if e is None or not isinstance(diagonal, int):
            return None
        off = _IDX[rank - 1] - _IDX[rank - 2]
        keep = sympy.Le(off, diagonal) if lower else sympy.Ge(off, diagonal)
        return sympy.And(keep, e) if _out(node).dtype == torch.bool else sympy.Piecewise((e, keep), (0, True))
    return rule


_RULES: dict[Any, Callable[[_MaskAlgebra, fx.Node], sympy.Basic | None]] = {
    aten.arange.default: _arange, aten.arange.start: _arange, aten.arange.start_step: _arange,
    aten.neg.default: _arith(lambda a, _alpha: -a),
    aten.where.self: lambda alg, n: _select(alg, n, *n.args[:3]),
    aten.masked_fill.Scalar: lambda alg, n: _select(alg, n, n.args[1], n.args[2], n.args[0]),
    aten.masked_fill.Tensor: lambda alg, n: _select(alg, n, n.args[1], n.args[2], n.args[0]),
    aten.unsqueeze.default: _unsqueeze, aten.expand.default: _expand, aten.slice.Tensor: _slice,
    aten.select.int: _select_int, aten.transpose.int: _permute, aten.permute.default: _permute,
    aten.index.Tensor: _index, aten.diff.default: _diff, aten.cumsum.default: _cumsum,
    aten.tril.default: _triangle(True), aten.triu.default: _triangle(False),
    aten.ones.default: _constant(lambda n: 1), aten.new_ones.default: _constant(lambda n: 1),
    aten.ones_like.default: _constant(lambda n: 1), aten.zeros.default: _constant(lambda n: 0),
    aten.new_zeros.default: _constant(lambda n: 0), aten.zeros_like.default: _constant(lambda n: 0),
    aten.full.default: _constant(lambda n: n.args[1]), aten.new_full.default: _constant(lambda n: n.args[2]),
    aten.full_like.default: _constant(lambda n: n.args[1]), aten.scalar_tensor.default: _constant(lambda n: n.args[0]),
}
for _op in ("add", "sub"):
    _sign = 1 if _op == "add" else -1
    for _ov in ("Tensor", "Scalar"):
        _RULES[getattr(getattr(aten, _op), _ov)] = _arith(lambda a, b, alpha, s=_sign: a + s * alpha * b)
_RULES[aten.mul.Tensor] = _RULES[aten.mul.Scalar] = _arith(lambda a, b, _alpha: a * b)
for _op, _rel in (("eq", sympy.Eq), ("ne", sympy.Ne), ("le", sympy.Le), ("lt", sympy.Lt), ("ge", sympy.Ge),
                  ("gt", sympy.Gt)):
    _RULES[getattr(aten, _op).Tensor] = _RULES[getattr(aten, _op).Scalar] = _compare(_rel)
for _op in (aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default):
    _RULES[_op] = _logical(sympy.And)
for _op in (aten.__or__.Tensor, aten.bitwise_or.Tensor, aten.logical_or.default):
    _RULES[_op] = _logical(sympy.Or)
for _op in (aten.logical_not.default, aten.bitwise_not.default):
    _RULES[_op] = _logical(sympy.Not)
for _op in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.clone.default,
            aten.alias.default, aten.detach.default):
    _RULES[_op] = _convert


# ------------------------------------------------------------------------------------------------- proofs

def _settles(e: sympy.Basic) -> sympy.Basic:
    """``e`` simplified, when small enough for sympy to do it quickly (sound either way: it only proves less)."""
    if isinstance(e, (sympy.logic.boolalg.BooleanAtom, sympy.Number)) or e in (sympy.oo, -sympy.oo):
        return e
    return sympy.simplify(e) if sympy.count_ops(e) <= 64 else e


def _is_causal_mask(expr: sympy.Basic, mask: torch.Tensor) -> bool:
    """``expr`` (the mask's value) is "attend" at every ``key <= query`` and "masked" at every ``key > query``.

    Substituting ``key = query - t`` and ``key = query + 1 + t`` (``t >= 0``) covers every index pair; the
    value must reduce to one constant each time, so it depends on no other index and no size. That pins the
    mask to exactly what ``is_causal=True`` means (the top-left ``tril``), for every size.
    """
    q, k = _IDX[mask.dim() - 2], _IDX[mask.dim() - 1]
    t = sympy.Symbol("_t", integer=True, nonnegative=True)
    below, above = (_settles(expr.xreplace({k: v})) for v in (q - t, q + 1 + t))
    if mask.dtype == torch.bool:
        return below is sympy.true and above is sympy.false
    return mask.dtype.is_floating_point and below == 0 and above == -sympy.oo


def _full_slice_input(node: Any) -> Any:
    """Walk back through ``x[:]``-style slices (start 0, step 1, same shape): they are ``x``."""
    while (isinstance(node, fx.Node) and node.target is aten.slice.Tensor and _tensor(node.args[0]) is not None
           and _args(node, (None, 0, None, None, 1))[2] in (0, None) and _args(node, (None, 0, None, None, 1))[4] == 1
           and len(_out(node).shape) == len(_out(node.args[0]).shape)
           and all(_same(a, b) for a, b in zip(_out(node).shape, _out(node.args[0]).shape))):
        node = node.args[0]
    return node


def _unrepeat(x: Any) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """``(kv, n, chain)`` when ``x`` is ``kv[:, :, None].expand(B, H, n, S, D).reshape(B, H * n, S, D)``.

    Query head ``h`` then reads KV head ``h // n`` (the reshape merges ``(H, n)`` row-major), as SDPA's
    ``enable_gqa`` does. ``chain`` holds the nodes between ``kv`` and ``x``, which the rewrite may leave dead.
    """
    if not isinstance(x, fx.Node) or x.target not in _RESHAPES:
        return None
    expand = _full_slice_input(x.args[0])
    if not isinstance(expand, fx.Node) or expand.target is not aten.expand.default:
        return None
    unsq = _full_slice_input(expand.args[0])
    if not isinstance(unsq, fx.Node) or unsq.target is not aten.unsqueeze.default or _tensor(unsq.args[0]) is None:
        return None
    kv = _full_slice_input(unsq.args[0])
    ks, es, xs = _out(kv).shape, _out(expand).shape, _out(x).shape
    if len(ks) != 4 or len(es) != 5 or _dim(unsq.args[1], 5) != 2 or not isinstance(es[2], int) or es[2] < 1:
        return None
    n = es[2]
    if not all(_same(a, b) for a, b in zip((es[0], es[1], es[3], es[4]), ks)):
        return None
    if len(xs) != 4 or not all(_same(a, b) for a, b in zip(xs, (ks[0], ks[1] * n, ks[2], ks[3]))):
        return None
    chain, node = [], x
    while node is not kv:  # every step above has its input at args[0]
        chain.append(node)
        node = node.args[0]
    return kv, n, chain


def _probe(t: torch.Tensor, grad: bool = False) -> torch.Tensor | None:
    """A real tensor like fake tensor ``t`` (its sizes and strides at the traced example), for the dispatcher."""
    sizes = []
    for s in (*t.shape, *t.stride()):
        h = s if isinstance(s, int) else getattr(s.node, "hint", None)
        if h is None:
            return None
        sizes.append(int(h))
    if t.device.type == "meta":
        return None
    out = torch.empty_strided(sizes[:t.dim()], sizes[t.dim():], dtype=t.dtype, device=t.device)
    return out.requires_grad_(grad and t.dtype.is_floating_point)


def _gqa_keeps_kernel(q, k, v, k_grouped, v_grouped, mask, dropout_p, is_causal, scale) -> bool:
    """The dispatcher picks a fused kernel for the grouped call, or it picked the math kernel anyway.

    On CUDA the memory-efficient kernel has no GQA, so grouping a masked or fp32 call would send it to the
    math kernel (slower, and it keeps the whole attention matrix); asking is exact for the graph's device,
    dtype, head size and mask, which torch.export fixes. Both with and without grad (training and inference).
    """
    try:
        for grad in (False, True):
            tq, tk, tv, tkg, tvg = (_probe(t, grad) for t in (q, k, v, k_grouped, v_grouped))
            tm = _probe(mask) if mask is not None else None
            if any(t is None for t in (tq, tk, tv, tkg, tvg)) or (mask is not None and tm is None):
                return False
            before = int(torch._fused_sdp_choice(tq, tk, tv, tm, dropout_p, is_causal, scale=scale))
            after = int(torch._fused_sdp_choice(tq, tkg, tvg, tm, dropout_p, is_causal, scale=scale, enable_gqa=True))
            if after == _MATH and before != _MATH:
                return False
        return True
    except Exception:  # a dispatcher that cannot be asked (another torch, an odd device): keep the expanded K/V
        return False


# --------------------------------------------------------------------------------------------------- pass

@dataclass
class _Plan:
    """What to change on one SDPA node."""

    node: fx.Node
    drop_mask: bool
    grouped: tuple[fx.Node, fx.Node] | None  # un-expanded (k, v)
    dead: list[fx.Node]  # nodes the change may leave unused


def _sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    """The SDPA call's arguments by name, defaults filled in."""
    schema = _SDPA._schema.arguments
    bound = {a.name: a.default_value for a in schema if a.has_default_value()}
    bound.update(zip((a.name for a in schema), node.args))
    bound.update(node.kwargs)
    return bound


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen and a.op == "call_function":
                seen.add(a)
                todo.append(a)
    return list(seen)


def _plan(node: fx.Node, alg: _MaskAlgebra, causal: bool, gqa: bool) -> _Plan | None:
    """What can be proved about one SDPA call (see the module docstring); None when nothing."""
    a = _sdpa_arguments(node)
    q, k, v, mask = (_tensor(a[name]) for name in ("query", "key", "value", "attn_mask"))
    if q is None or k is None or v is None or q.dim() < 2 or k.dim() < 2:
        return None
    # is_causal is the top-left tril: the same as the mask only with the mask's own [L, S] and L == S for all sizes
    square = mask is not None and mask.dim() >= 2 and _same(q.shape[-2], k.shape[-2]) \
        and _same(mask.shape[-2], q.shape[-2]) and _same(mask.shape[-1], k.shape[-2])
    drop_mask = bool(causal and square and not a["is_causal"]
                     and (expr := alg.value(a["attn_mask"])) is not None and _is_causal_mask(expr, mask))
    dead = _ancestors(a["attn_mask"]) if drop_mask else []
    grouped = None
    if gqa and not a["enable_gqa"] and q.dim() == 4:
        rk, rv = _unrepeat(a["key"]), _unrepeat(a["value"])
        if (rk is not None and rv is not None and rk[1] == rv[1] and _same(q.shape[1], k.shape[1])
                and _same(_out(rk[0]).shape[1], _out(rv[0]).shape[1])
                and _gqa_keeps_kernel(q, k, v, _out(rk[0]), _out(rv[0]), None if drop_mask else mask,
                                      a["dropout_p"], a["is_causal"] or drop_mask, a["scale"])):
            grouped, dead = (rk[0], rv[0]), dead + rk[2] + rv[2]
    return _Plan(node, drop_mask, grouped, dead) if drop_mask or grouped else None


def _erase_dead(graph: fx.Graph, region: set[fx.Node]) -> None:
    """Erase the nodes of ``region`` left unused, users first.

    ``_assert_tensor_metadata`` checks on a dropped mask's intermediates would keep the whole mask computation
    alive (asserts are side effects to dead-code elimination); they check a dtype, device and layout the
    graph fixes, on values no longer computed, so they go with them. Nothing outside ``region`` is touched.
    """
    for node in reversed(list(graph.nodes)):
        if node not in region or node.op != "call_function":
            continue
        users = list(node.users)
        if all(u.op == "call_function" and u.target is _ASSERT_META and not u.users for u in users):
            for u in users:
                graph.erase_node(u)
            if not node.is_impure():
                graph.erase_node(node)


@dataclass(frozen=True)
class NormalizeAttention:
    """Give ``aten.scaled_dot_product_attention`` what eager HF gives it: ``is_causal`` and grouped K/V.

    See the module docstring for what each rewrite proves. Outputs are unchanged (up to the kernels'
    summation order); idempotent: a second run finds nothing to prove. :func:`fxpeft.trace` runs it on
    export graphs unless ``normalize_attention=False``.

    Args:
        causal: drop a provably causal-only mask for ``is_causal=True``.
        gqa: feed un-expanded grouped K/V with ``enable_gqa=True``.

    Example:
        >>> import torch, fxpeft
        >>> from fxpeft.passes import NormalizeAttention
        >>> from fxpeft.zoo import tiny_llama
        >>> model, args, kwargs = tiny_llama(layers=1)
        >>> gm = fxpeft.trace(model, args, kwargs, normalize_attention=False)
        >>> NormalizeAttention()(gm).modified, NormalizeAttention()(gm).modified
        (True, False)
        >>> sdpa = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
        >>> sdpa.args[3:], sdpa.kwargs["enable_gqa"]
        ((None, 0.0, True), True)
    """

    causal: bool = True
    gqa: bool = True

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        alg = _MaskAlgebra()
        plans = [p for n in gm.graph.nodes if n.op == "call_function" and n.target is _SDPA
                 for p in [_plan(n, alg, self.causal, self.gqa)] if p is not None]
        if not plans:
            return PassResult(gm, False)
        with transaction(gm):  # ---- everything proved: mutate from here on, all or nothing ----
            region: set[fx.Node] = set()
            for p in plans:
                a = _sdpa_arguments(p.node)
                mask, is_causal = (None, True) if p.drop_mask else (a["attn_mask"], a["is_causal"])
                k, v = p.grouped or (a["key"], a["value"])
                kwargs = {"scale": a["scale"]} if a["scale"] is not None else {}
                if p.grouped or a["enable_gqa"]:
                    kwargs["enable_gqa"] = True
                p.node.args = (a["query"], k, v, mask, a["dropout_p"], is_causal)
                p.node.kwargs = kwargs
                region.update(p.dead)
            _erase_dead(gm.graph, region)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, True)
