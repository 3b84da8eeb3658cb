"""LoRA: ``y = base(x) + B(A(dropout(x))) * scaling``, with PEFT's maths per site kind. One file: config,
sites, nodes, fold, and PEFT's file format.

* linear: A ``[r, in]``, B ``[out, r]``;
* conv: A is a conv with the base kernel, stride, padding and dilation (``[r, in, *k]``), B a 1x1 conv ``[out, r, 1..]``;
* embedding: A ``[r, num_embeddings]``, B ``[dim, r]``, delta ``embedding(x, A.T) @ B.T`` (no dropout, as in PEFT).

The scaling multiplies the rank-``r`` intermediate rather than the ``out``-wide result: the same product,
``out / r`` times fewer multiplies. It is a buffer read at run time (0 while the adapter is switched off).

DoRA (``use_dora=True``) adds a trained magnitude ``m`` per output and rescales, with PEFT's formula::

    g   = m / ||W + s·B·A||          per output (PEFT's norm orientation), detached from autograd (DoRA §4.3)
    out = y + (g - 1)·y0 + g·B(A(dropout(x)))·s

``y0`` is the base output without its bias; in training behind a dropout it is, as in PEFT, the base weight
applied to the dropped-out input (:class:`DoraBase`, an extra base matmul). ``g`` scales B's rows (a tiny
``[out, r]`` op), so the up projection gives ``g·B(A(x))·s``; with no bias and no dropout (and for an embedding,
where PEFT computes ``g·y + g·lora``) the graph computes ``g·y + (g·B)(A(x))·s``, the sum accumulated in place: no
activation-sized tensor more than LoRA's ``y + B(A(x))·s``. The norm is computed in fp32, in factored form, never
building ``B·A``
(:func:`dora_norm`), from the weight as it is at that call (so a merged adapter or a reloaded base weight
counts at once). While the adapter is off or merged, ``g`` is exactly 1 (the ``gate`` buffer). Folding writes
``g·(W + s·B·A)`` and keeps that norm for the unfold, as PEFT caches it. DoRA does not commute with other adapters
on its site: with several active there at once, the graph applies the one added last next to the base, PEFT the
one listed first (their outputs then differ; one active adapter per site gives PEFT's).

PEFT's file layout (keys under ``base_model.model.<site>.``)::

    lora_A.weight       [r, in]          ([r, in, *kernel] for a conv)
    lora_B.weight       [out, r]         ([out, r, 1, ...] for a conv)
    lora_embedding_A    [r, num_embeddings]
    lora_embedding_B    [embedding_dim, r]
    lora_magnitude_vector  [out]     (DoRA; [1, out, 1, ...] for a conv, [embedding_dim] for an embedding)
    lora_B.bias         [out]            (lora_bias=True: ``B(a·s) + b·s`` in the graph; linear and conv sites)

**ALF's balanced conv** (``conv_reshape="balanced"``; fxpeft's own, not PEFT's). A conv weight
``[out, in, k0, *k']`` (``k0`` the first kernel axis, ``k'`` the others: ``kw`` for a Conv2d, ``kh, kw`` for a Conv3d,
none for a Conv1d) is seen as the matrix ``[out·k0, in·K']`` (``K' = prod(k')``) and decomposed there, so that a small
``out`` no longer limits what the rank saves::

    A [r, in·K']     B [out·k0, r]     (r·(in·K' + out·k0) parameters; standard LoRA: r·(in·k0·K' + out))
    ΔW = s · (B @ A)  [out·k0, in·K']  -view->  [out, k0, in, *k']  -permute(0, 2, 1, 3, ...)->  [out, in, k0, *k']

The graph never builds ΔW: the sum over the kernel splits into two convolutions, A along ``k'`` (kernel
``[r, in, 1, *k']``, the base stride/padding/dilation on ``k'``'s axes, none on ``k0``'s) and then B along ``k0``
(kernel ``[out, r, k0, 1, ...]``, the base's on ``k0``'s axis)::

    a = conv(x, A.view(r, in, 1, *k'))                   [N, r, H, *spatial']   (every input row: B's taps read them)
    y = y + conv(a·s, B.view(out, k0, r).permute(0, 2, 1).view(out, r, k0, 1, ...))

exactly ``conv(x, ΔW)``. The merge folds ΔW (exact). Its files hold A and B as the matrices above under PEFT's
key names, and ``"conv_reshape": "balanced"`` in ``adapter_config.json``: PEFT ignores that field (with a warning)
and then refuses the tensors, whose shapes are not its conv LoRA's. DoRA, mixed batches and weighted merges are
refused on it.

``bias="all"``/``"lora_only"`` train copies of base biases (:mod:`fxpeft.copies`, generic to every method).

Initialisations (``init_lora_weights``), PEFT's maths on linear sites (``W`` is ``[out, in]``, fp32)::

    True / "gaussian"   A kaiming-uniform / normal(std 1/r), B = 0
    False               A and B random (the adapter changes the outputs from the start)
    "orthogonal"        A, B from one random orthogonal r x r matrix (its odd / even rows), scaled 1/10; even r
    "pissa"             W = U S Vᵀ: B = U_r·sqrt(S_r/s), A = sqrt(S_r/s)·V_rᵀ, base W_res = W - s·B·A
    "pissa_niter_<k>"   the same from torch.svd_lowrank (k subspace iterations, random)
    "olora"             W = Q R: B = Q_r, A = R_r, base W_res = W - s·B·A
    "mica"              B = the r left singular vectors of the *smallest* singular values (frozen), A = 0

PiSSA and OLoRA replace the base weight by the residual (:meth:`Method.base_update`): the outputs are unchanged at
init, and the adapter keeps its initial factors (``A0``, ``B0``) so that ``save_adapter(...,
convert_to_original_base=True)`` writes the plain rank-``2r`` LoRA ``[B, -B0]·[A; A0]`` that applies to the original
base, as PEFT's ``path_initial_model_for_weight_conversion`` does.

aLoRA (``alora_invocation_tokens``, linear sites): each row's update acts only from the start of the last occurrence
of the invocation sequence in ``input_ids`` to the end; before it, the outputs are exactly the base model's (a KV
cache built by the base stays valid); a row without it gets no update. The start is computed in the graph from the
``input_ids`` input feeding the input embedding (windows compared with the tokens, the last match per row, a
``[B, T, 1]`` mask on the update), so torch.compile and a .pt2 export run it. PEFT's ``alora_offsets`` count the same
start back from the end of the row, padding included: ``offset = T - start``; the graph takes them as an optional
keyword, ``gm(..., alora_offsets=<int [B]>)`` (0: no invocation), used instead of its own where given. In a mixed
batch, aLoRA and plain LoRA rows mix (each aLoRA row masked from its own invocation). Not a weight delta, so never
merged.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxpeft.errors import AdapterFileError, ConfigError, InputShapeError, MergeError, UnsupportedSiteError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry, config_from_fields, is_unset
from fxpeft.scope import call_scratch
from fxpeft.sites import Site
from fxpeft.tags import Role
from fxpeft.untrusted import compile_pattern, pattern_key_match

from . import lora_parameters as _lp

if TYPE_CHECKING:
    from fxpeft.combine import Combination

__all__ = ["LoraConfig", "LoraAdapter", "LoraDropout", "DoraBase", "dora_norm", "Lora"]

aten = torch.ops.aten


@dataclass
class LoraConfig(PeftConfigBase):
    """LoRA settings, with HF PEFT's field names and defaults.

    Args:
        r: rank of the update.
        lora_alpha: scaling numerator: scaling is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter's input (a ``call_module`` on ``nn.Dropout``).
        target_modules: list of names (exact, or matching the last dotted components), a regex string that
            must full-match, or ``"all-linear"``.
        exclude_modules: same forms as ``target_modules``; matching sites are skipped.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        init_lora_weights: True (kaiming A, zero B), ``"gaussian"`` (normal A with std ``1/r``, zero B), False
            (both random: the adapter changes the outputs from the start), ``"orthogonal"``, ``"pissa"``,
            ``"pissa_niter_<k>"``, ``"olora"`` (these two leave the base weight the residual) or ``"mica"`` (B
            frozen); the module docstring gives each one's maths.
        rank_pattern: ``{pattern: r}`` overrides per site (PEFT's matching: ``(.*\\.)?pattern$``).
        alpha_pattern: ``{pattern: alpha}`` overrides per site.
        fan_in_fan_out: accepted for PEFT compatibility; fxpeft reads the weight layout off the graph.
        bias: ``"none"``; ``"all"`` trains every base bias, ``"lora_only"`` the adapted sites' biases, each as a
            per-adapter copy (:mod:`fxpeft.copies`; PEFT's file keys).
        lora_bias: B gets a trained bias (PEFT's ``lora_B.bias``), scaled with the update. ``merge`` folds it into
            the site's bias, giving a site without one a new bias (PEFT cannot merge it there).
        use_dora: DoRA: a trained magnitude per output rescales the adapted weight (``lora.py``'s docstring).
        keep_base_dtype: keep A and B in a bf16/fp16 base's dtype instead of fp32 (PEFT's default is fp32).
        trainable_token_indices: token ids whose embedding rows train beside LoRA: a list (the input embedding) or
            ``{module: [ids]}`` (:mod:`fxpeft.methods.trainable_tokens`, injected under the same adapter name).
        target_parameters: parameters (paths, or dotted suffixes: ``["experts.gate_up_proj"]``) adapted before all
            their uses, PEFT's ``ParamWrapper``: 2-D ``[out, in]`` or 3-D experts ``[E, out, in]`` (A ``[r·E, in]``, B
            ``[out, r·E]``), or a conv weight through its ``[out, in·k]`` view; no dropout, DoRA, lora_bias or
            fan_in_fan_out there (:mod:`fxpeft.methods.lora_parameters`, which also adapts an
            ``nn.MultiheadAttention`` named in ``target_modules`` as PEFT does).
        conv_reshape: ``"standard"`` (PEFT's conv LoRA) or ``"balanced"`` (ALF: conv sites decompose the weight
            seen as ``[out·k0, in·K']``; the module docstring gives the maths). fxpeft's own: PEFT refuses its files.
        alora_invocation_tokens: aLoRA (activated LoRA): token ids of the invocation sequence. Each row's update acts
            only from the start of the *last* occurrence of the sequence in that row's ``input_ids`` to the end (earlier
            outputs are exactly the base model's; a row without the sequence gets no adapter). The start is found
            inside the graph from the ``input_ids`` input (see :func:`alora_mask`), or taken from PEFT's per-row
            ``alora_offsets`` keyword when the caller passes it. Linear sites only; no merge.

    Example:
        >>> from fxpeft import LoraConfig
        >>> LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]).r
        8
        >>> LoraConfig(r=4, target_modules=["conv1"], conv_reshape="balanced").conv_reshape
        'balanced'
        >>> LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=[7, 8]).alora_invocation_tokens
        [7, 8]
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None
    conv_reshape: str = "standard"
    alora_invocation_tokens: list[int] | None = None


class LoraDropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask on the CPU (PyTorch's CPU ``bernoulli_`` costs ~6 ns per element).

    In training on the CPU it draws 16 random bits per element (four per 64-bit draw of the default
    generator, so ``torch.manual_seed`` reproduces it) and keeps an element when they fall below
    ``round((1 - p) * 2**16)``: ``p`` is rounded to a multiple of ``2**-16`` (off by at most ``7.7e-6``), and
    kept elements are scaled by the exact inverse of the keep probability, so the expectation is unchanged.
    Under ``torch.compile`` and ``torch.func`` transforms (vmap's randomness rules), on other devices, in eval mode,
    and for ``p`` that rounds to 0 or 1 it is ``nn.Dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = 65536 - round(self.p * 65536)
        if (not self.training or self.inplace or x.device.type != "cpu" or not 0 < keep < 65536
                or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()):
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None).view(torch.int16)[:n]
        return _KeepMask.apply(x, bits.view(x.shape) < keep - 32768, 65536 / keep)


class _KeepMask(torch.autograd.Function):
    """``where(keep, x, 0) * scale``, saving the bool ``keep`` (1 byte an element) for backward where autograd's ``mul``
    by a float mask would save the mask (4 bytes, as ``nn.Dropout`` does on the CPU). Kept elements are ``x * scale``
    exactly; a dropped element is 0, also where ``x`` is inf or NaN (``nn.Dropout``'s ``x * 0`` gives NaN there).
    ``where`` then an in-place scale is ~4x cheaper on the CPU than building the float mask and multiplying by it;
    the gradient (and the forward-mode tangent) is the same ``where`` on ``grad``."""

    generate_vmap_rule = True  # with setup_context: torch.func transforms (grad, vmap) work through it

    @staticmethod
    def forward(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        return _masked(x, keep, scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, keep, ctx.scale = inputs
        ctx.save_for_backward(keep)
        ctx.keep = keep  # forward-mode AD's jvp runs before backward and cannot read saved tensors

    @staticmethod
    def jvp(ctx, x_t: torch.Tensor, keep_t, scale_t) -> torch.Tensor:
        return _masked(x_t, ctx.keep, ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return _masked(grad, keep, ctx.scale), None, None


def _masked(t: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    # the scale in t's dtype, as a float mask in that dtype would hold it
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype)).mul_(torch.full((), scale, dtype=t.dtype))


def adapter_dtype(weight: torch.Tensor, keep_base_dtype: bool) -> torch.dtype:
    """PEFT's ``autocast_adapter_dtype``: adapters on a bf16/fp16 base are kept in fp32 unless asked otherwise."""
    if not keep_base_dtype and weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


_MAGNITUDE_KEY = "lora_magnitude_vector"
_BIAS_KEY = "lora_B.bias"


def _add_lora_bias(adapter: LoraAdapter, site: Site, init: bool | str) -> None:
    """``lora_bias=True``: B's bias ``[out]``, zero (PEFT's init), or ``nn.Linear``'s default with random weights."""
    b = torch.zeros(site.out_features, dtype=adapter.B.dtype, device=adapter.B.device)
    if init is False:  # PEFT leaves lora_B as nn.Linear / nn.Conv initialised it: fan_in = r
        bound = 1 / math.sqrt(adapter.r)
        nn.init.uniform_(b, -bound, bound)
    adapter.B_bias = nn.Parameter(b)


def _bias_fold(adapter: LoraAdapter, bias: torch.Tensor | None, sign: float) -> torch.Tensor | None:
    """The site's bias with B's bias (lora_bias) folded in (``sign=-1``: out); a site without a bias gets one."""
    if not hasattr(adapter, "B_bias"):
        return bias
    step = adapter.B_bias.detach().float() * (adapter.scaling * sign)
    return step if bias is None else bias + step


def _magnitude_shape(site: Site) -> tuple[int, ...]:
    """PEFT's shape of DoRA's magnitude: ``[out]``, or ``[1, out, 1, ...]`` for a conv (it broadcasts on the output)."""
    return (1, site.out_features, *(1,) * len(site.kernel_size)) if site.kind == "conv" else (site.out_features,)


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """DoRA's weight norm is computed in fp32 (fp64 for fp64 adapters), whatever the half dtypes around it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _eager(aten_op, *args, role: Role | None = None, label: str | None = None, **kwargs):
    return aten_op(*args, **kwargs)


def dora_norm(op, weight, A, B, s, site: Site, dtype: torch.dtype, factors_dtype: torch.dtype):
    """PEFT's DoRA norm ``||W + s·B·A||`` per output, computed without building ``B·A``::

        ||w_i + s·(BA)_i||² = ||w_i||² + (sB)_i · (2·(W·Aᵀ)_i + (sB)_i·(A·Aᵀ))

    ``W·Aᵀ`` (``[out, r]``) is the one product with the weight, ``O(out·in·r)``; the rest is ``O(in·r² + out·r²)``.
    ``A`` and ``B`` are read detached: the norm is a constant for autograd (DoRA §4.3), and records nothing.

    ``op(aten_op, *args, role=..., label=..., **kwargs)`` applies an aten op, as graph nodes named after the terms
    (``q_proj_WAt``; :meth:`Lora.insert`) or eagerly
    (the magnitude's init): the same ops either way, so that with ``B = 0`` the graph's norm equals the initial
    magnitude to the bit and a zero-initialised adapter changes nothing.

    Args:
        weight: the base weight in its stored layout, already in ``dtype``.
        A, B: the adapter's factors in PEFT's layout, in ``factors_dtype``; s: its scaling (a 0-dim tensor).
        dtype: the dtype of the computation and the result (``[out]``).
    """
    if site.kind == "conv":
        weight, A, B = (op(aten.flatten.using_ints, t, 1) for t in (weight, A, B))  # [out, in·k], [r, in·k], [out, r]
    elif site.kind == "embedding" or site.fan_in_fan_out:
        weight = op(aten.t.default, weight)  # [in, out] (an embedding: [num, dim]) seen as [out, in]
    A, B = op(aten.detach.default, A, label="A_const"), op(aten.detach.default, B, label="B_const")
    if factors_dtype != dtype:
        A, B = op(aten._to_copy.default, A, dtype=dtype), op(aten._to_copy.default, B, dtype=dtype)
    sB = op(aten.mul.Tensor, B, s, label="sB")  # [out, r]
    wa = op(aten.linear.default, weight, A, label="WAt")  # W·Aᵀ: [out, r]
    aa = op(aten.linear.default, A, A, label="AAt")  # A·Aᵀ: [r, r]
    v = op(aten.addmm.default, wa, sB, aa, beta=2, label="twoWAt_sBAAt")  # 2·W·Aᵀ + sB·A·Aᵀ
    cross = op(aten.sum.dim_IntList, op(aten.mul.Tensor, sB, v, label="cross_terms"), [1], label="cross")  # 0 if B = 0
    w = op(aten.linalg_vector_norm.default, weight, 2, [1], label="W_row_norm")  # ||w_i||
    return op(aten.sqrt.default, op(aten.addcmul.default, cross, w, w, label="weight_norm_sq"), role=Role.WEIGHT_NORM)


class DoraBase(nn.Module):
    """DoRA's ``y0`` behind a dropout, as PEFT computes it: in training the base weight applied to the dropped-out
    input, without bias (PEFT's ``base_result=None`` branch); in eval the given ``y0`` (the site's output less its
    bias: the dropout is the identity then). A module, so that ``train()``/``eval()`` switch it as they switch the
    dropout."""

    def __init__(self, site: Site) -> None:
        super().__init__()
        self.kind, self.fan_in_fan_out = site.kind, site.fan_in_fan_out
        if site.kind == "conv":
            self.conv = (F.conv1d, F.conv2d, F.conv3d)[len(site.kernel_size) - 1]
            self.stride, self.dilation = tuple(site.stride), tuple(site.dilation)
            self.padding = site.padding if isinstance(site.padding, str) else tuple(site.padding)

    def forward(self, y0: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return y0
        weight = weight.to(x.dtype)
        if self.kind == "conv":
            return self.conv(x, weight, None, self.stride, self.padding, self.dilation)
        return F.linear(x, weight.t() if self.fan_in_fan_out else weight)


_GAIN = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))  # calculate_gain("leaky_relu", math.sqrt(5)), as nn.Linear uses


def _kaiming_uniform(t: torch.Tensor) -> None:
    """``nn.init.kaiming_uniform_(t, a=math.sqrt(5))`` with the same bound and the same draw (bit-identical), less
    its per-call argument handling: a rewrite initialises one ``A`` per site."""
    if t.numel() == 0:  # nn.init leaves an empty tensor as it is (and its fan-in may be 0)
        return
    bound = math.sqrt(3.0) * (_GAIN / math.sqrt(t.shape[1] * math.prod(t.shape[2:])))  # nn.init's order of operations
    t.uniform_(-bound, bound)


class LoraAdapter(AdapterModule):
    """The parameters of one LoRA adapter at one site: ``A``, ``B``, an optional ``dropout``, and the
    run-time ``scale`` buffer (``scaling`` while on, 0 while off). With DoRA also the trained ``magnitude``
    (PEFT's shape), and ``dora_base`` behind a dropout."""

    method = "lora"

    def __init__(self, site: Site, adapter_name: str, r: int, lora_alpha: float, use_rslora: bool,
                 dropout: float, dtype: torch.dtype, device: torch.device, use_dora: bool = False,
                 balanced: bool = False) -> None:
        super().__init__(site.name, adapter_name)
        # plain attributes straight into __dict__ (see AdapterModule.__init__): one module per site of a rewrite
        self.__dict__.update(kind=site.kind,
                             balanced=balanced and site.kind == "conv",  # ALF: A [r, in·K'], B [out·k0, r]
                             r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
                             scaling=lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r, use_dora=use_dora)
        kw = dict(dtype=dtype, device=device)
        if self.balanced:
            a_shape, b_shape = _balanced_shapes(site, r)
        elif site.kind == "conv":
            a_shape = (r, site.in_features, *site.kernel_size)
            b_shape = (site.out_features, r, *(1,) * len(site.kernel_size))
        else:  # linear: in/out features; embedding: num_embeddings/embedding_dim
            a_shape, b_shape = (r, site.in_features), (site.out_features, r)
        # straight into the tables, as AdapterModule does: register_parameter/register_buffer check names that are
        # known good here, and cost more than the tensors themselves (once per site of a rewrite)
        self._parameters.update(A=nn.Parameter(torch.empty(a_shape, **kw)), B=nn.Parameter(torch.empty(b_shape, **kw)))
        # ``scale``: the run-time scaling (0 while off); ``mixed_scale``: a mixed batch serves any adapter, on or off
        self._buffers.update(scale=torch.full((), self.scaling, **kw), mixed_scale=torch.full((), self.scaling, **kw))
        self._non_persistent_buffers_set.update(("scale", "mixed_scale"))
        if dropout > 0 and site.kind != "embedding":
            self.dropout = LoraDropout(dropout)
        if use_dora:
            self.magnitude = nn.Parameter(torch.empty(_magnitude_shape(site), **kw))
            # the norm a fold divided by, for the unfold (a merged weight keeps no trace of it; PEFT caches it too)
            self.register_buffer("merged_norm", torch.ones(site.out_features, dtype=torch.float32, device=device),
                                 persistent=False)
            if hasattr(self, "dropout"):
                self.dora_base = DoraBase(site)

    def gate_changed(self, on: bool) -> None:
        with torch.no_grad():
            self.scale.fill_(self.scaling if on else 0.0)
            self.mixed_scale.fill_(self.scaling)

    def reset_parameters(self, init: bool | str) -> None:
        with torch.no_grad():
            if self.kind == "embedding":
                if init is False:
                    nn.init.normal_(self.A), nn.init.normal_(self.B)
                else:  # PEFT (after loralib): zero A, normal B
                    nn.init.zeros_(self.A), nn.init.normal_(self.B)
                return
            if init == "gaussian":
                nn.init.normal_(self.A, std=1 / self.r)
            else:
                _kaiming_uniform(self.A)
            if init is False:
                _kaiming_uniform(self.B)
            else:
                self.B.zero_()

    def delta_weight(self, site: Site) -> torch.Tensor:
        """The fp32 update to the base weight, in the weight's own layout."""
        A, B, s = self.A.detach().float(), self.B.detach().float(), self.scaling
        if self.balanced:
            return _balanced_to_weight((B @ A) * s, site)
        if site.kind == "conv":
            # [out, r] @ [r, in*k] -> [out, in, *k]
            return (B.flatten(1) @ A.flatten(1)).view(site.out_features, site.in_features, *site.kernel_size) * s
        delta = (B @ A) * s  # [out, in]; for an embedding [dim, num]
        return delta.T if (site.kind == "embedding" or site.fan_in_fan_out) else delta

    def add_delta(self, site: Site, weight: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        """``weight ± ΔW`` (fp32) in one multiply-add, with no ΔW temporary: the merge's fold and unfold."""
        A, B, alpha = self.A.detach().float(), self.B.detach().float(), sign * self.scaling
        if self.balanced:  # ΔW is a permuted view of B @ A: no addmm into the weight's layout
            return weight + _balanced_to_weight(B @ A, site) * alpha
        if site.kind == "conv":  # [out, in·k] + [out, r] @ [r, in·k], seen back as [out, in, *k]
            return torch.addmm(weight.flatten(1), B.flatten(1), A.flatten(1), alpha=alpha).view(weight.shape)
        if site.kind == "embedding" or site.fan_in_fan_out:  # stored transposed: ΔWᵀ = Aᵀ @ Bᵀ
            return torch.addmm(weight, A.T, B.T, alpha=alpha)
        return torch.addmm(weight, B, A, alpha=alpha)

    def init_magnitude(self, site: Site, weight: torch.Tensor) -> None:
        """PEFT's DoRA init, ``m = ||W + s·B·A||`` per output, computed with the graph's own ops (:func:`dora_norm`).

        Raises:
            UnsupportedSiteError: an output's base weight is all zeros (PEFT divides by its zero norm: NaN).
        """
        nd = _norm_dtype(self.A.dtype)
        if weight.is_meta:  # a rewrite before the weights are loaded: load_weights replays this on the real weight
            return
        with torch.no_grad():
            w = weight.detach()
            w = w.to(nd) if w.dtype != nd else w
            rows = w.flatten(1) if site.kind == "conv" else (w.t() if site.kind == "embedding" or site.fan_in_fan_out
                                                             else w)
            zero = (rows == 0).all(1).nonzero().flatten().tolist()
            if zero:
                raise UnsupportedSiteError(
                    f"site {site.name!r}: DoRA divides each output by the norm of its weight, and {len(zero)} of the "
                    f"{rows.shape[0]} outputs have all-zero weights (the first: output {zero[0]}); PEFT gives NaN "
                    "there. Leave the site out (exclude_modules) or use plain LoRA (use_dora=False)")
            norm = dora_norm(_eager, w, self.A, self.B, self.scale, site, nd, self.A.dtype)
            self.magnitude.copy_(norm.view(self.magnitude.shape))

    def dora_fold(self, site: Site, weight: torch.Tensor, undo: bool = False) -> torch.Tensor:
        """``weight`` (fp32, its stored layout) with DoRA folded in: ``g·(W + s·B·A)``, ``g = m / ||W + s·B·A||``
        per output (PEFT's merge; the norm is kept for the unfold); or, with ``undo``, ``W'/g - s·B·A``."""
        delta = self.delta_weight(site)
        out_dim = 1 if (site.kind == "embedding" or site.fan_in_fan_out) else 0
        shape = [1] * weight.dim()
        shape[out_dim] = -1
        m = self.magnitude.detach().float().reshape(-1)
        if undo:
            return weight / (m / self.merged_norm.float()).view(shape) - delta
        adapted = weight + delta
        norm = torch.linalg.vector_norm(adapted, dim=[d for d in range(weight.dim()) if d != out_dim])
        with torch.no_grad():
            self.merged_norm.copy_(norm)
        return adapted * (m / norm).view(shape)


def _balanced_shapes(site: Site, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """ALF's A ``[r, in·K']`` and B ``[out·k0, r]`` for a conv with kernel ``(k0, *k')``, ``K' = prod(k')``."""
    k0, *rest = site.kernel_size
    return (r, site.in_features * math.prod(rest)), (site.out_features * k0, r)


def _balanced_to_weight(m: torch.Tensor, site: Site) -> torch.Tensor:
    """ALF's matrix ``[out·k0, in·K']`` in the conv weight's layout ``[out, in, k0, *k']`` (a permuted view)."""
    k0, *rest = site.kernel_size
    m = m.view(site.out_features, k0, site.in_features, *rest)  # [out, k0, in, *k']
    return m.permute(0, 2, 1, *range(3, m.dim()))  # [out, in, k0, *k']


def _conv_op(site: Site):
    """The aten conv of the site's rank, and its overload for the site's padding (a string, or per-axis ints)."""
    op = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[len(site.kernel_size)]
    return op.padding if isinstance(site.padding, str) else op.default


def _balanced_down(emit: Emit, site: Site, A: fx.Node, x: fx.Node) -> fx.Node:
    """ALF's first conv: A along the kernel axes ``k'`` only, the base's windows there; every position along
    ``k0``'s axis (B's taps gather them, with the base's stride, padding and dilation on that axis)."""
    _, *rest = site.kernel_size
    kernel = emit.op(aten.view.default, A, [-1, site.in_features, 1, *rest], label="A_kernel")  # [r, in, 1, *k']
    pad = site.padding if isinstance(site.padding, str) else [0, *site.padding[1:]]
    return emit.op(_conv_op(site), x, kernel, None, [1, *site.stride[1:]], pad, [1, *site.dilation[1:]], 1,
                   role=Role.DOWN)  # [N, r, H, *spatial']


def _balanced_up(emit: Emit, site: Site, B: fx.Node, a: fx.Node, bias: fx.Node | None) -> fx.Node:
    """ALF's second conv: B's ``k0`` taps along the first kernel axis (the base's stride, padding, dilation there)."""
    k0, *rest = site.kernel_size
    kernel = emit.op(aten.view.default, B, [site.out_features, k0, -1], label="B_taps")  # [out·k0, r] -> [out, k0, r]
    kernel = emit.op(aten.permute.default, kernel, [0, 2, 1], label="B_taps_t")  # [out, r, k0]
    kernel = emit.op(aten.reshape.default, kernel, [site.out_features, -1, k0, *(1,) * len(rest)],
                     label="B_kernel")  # [out, r, k0, 1, ...]
    pad = site.padding if isinstance(site.padding, str) else [site.padding[0], *(0,) * len(rest)]
    ones = [1] * len(rest)
    return emit.op(_conv_op(site), a, kernel, bias, [site.stride[0], *ones], pad, [site.dilation[0], *ones], 1,
                   role=Role.UP)  # [N, out, *spatial]


_KEYS = {"linear": ("lora_A.weight", "lora_B.weight"), "conv": ("lora_A.weight", "lora_B.weight"),
         "parameter": ("lora_A.weight", "lora_B.weight"),
         "embedding": ("lora_embedding_A", "lora_embedding_B")}
_CONVERT = ("rewrites the base weights; convert the trained adapter with PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) and load that plain LoRA")
#: PEFT inits fxpeft does not compute (they need calibration data, a quantiser or gradients), and what to do instead
_REFUSED_INITS = {"corda": "CorDA needs calibration activations and " + _CONVERT,
                  "loftq": "LoftQ needs a quantiser and " + _CONVERT,
                  "lora_ga": "LoRA-GA needs gradients and " + _CONVERT,
                  "eva": ("EVA needs activations (peft.initialize_lora_eva_weights); a trained EVA adapter is plain LoRA: "
                          "its file loads with init_lora_weights set to true and eva_config to null")}
#: PEFT LoraConfig fields of LoRA variants fxpeft does not implement: each changes what the adapter computes, so a
#: file or config that sets one is refused rather than loaded as plain LoRA. Fields a later fxpeft LoraConfig gains
#: become its own and are no longer refused here.
_VARIANT_FIELDS = {"megatron_config": "Megatron-LM tensor-parallel LoRA layers", "loftq_config": "LoftQ",
                  "eva_config": "EVA", "corda_config": "CorDA", "lora_ga_config": "LoRA-GA", "velora_config": "VeLoRA",
                  "use_qalora": "QALoRA", "monteclora_config": "MonteCLoRA", "layer_replication": "layer replication",
                  "use_bdlora": "BD-LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
                  "ensure_weight_tying": "tied adapters on tied layers"}


_MAX_NITER = 100


def _init_kind(init: bool | str) -> str:
    """``"pissa_niter_4"`` -> ``"pissa"``; True/False/"gaussian" -> ``"plain"``."""
    if not isinstance(init, str) or init == "gaussian":
        return "plain"
    return "pissa" if init.startswith("pissa") else init


def _valid_init(init: Any) -> bool:
    if isinstance(init, bool):
        return True
    if not isinstance(init, str):
        return False
    if init.startswith("pissa_niter_"):
        k = init[len("pissa_niter_"):]  # bounded: the value may come from an untrusted file, each iteration costs
        return k.isdigit() and k.isascii() and int(k) <= _MAX_NITER
    return init in ("gaussian", "orthogonal", "pissa", "olora", "mica")


def _file_init(init: bool | str) -> bool | str:
    """The ``init_lora_weights`` a file records: the inits PEFT must re-run on load (they rewrite the base weight,
    or freeze B) as they are; the others as True (the file's weights replace what they drew)."""
    return init if _init_kind(init) in ("pissa", "olora", "mica") else True


def _as_matrix(weight: torch.Tensor, site: Site) -> torch.Tensor:
    """The weight as fp32 ``[out, in]`` (an embedding's ``[num, dim]`` as ``[dim, num]``), as PEFT's inits see it."""
    w = weight.detach().to(torch.float32)
    return w.T if site.kind == "embedding" or site.fan_in_fan_out else w


def _orthogonal_factors(r: int, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's orthogonal init, from the default CPU generator."""
    q, _ = torch.linalg.qr(torch.randn(r, r))
    A = torch.randn(site.in_features, r // 2).mm(q[0::2, :]).T / 10.0  # [in, r/2] @ [r/2, r] -> [r, in]
    B = torch.randn(r // 2, site.out_features).T.mm(q[1::2, :]) / 10.0  # [out, r/2] @ [r/2, r] -> [out, r]
    return A, B


def _svd_factors(w: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA: the top-``r`` singular triplets of ``w [out, in]``, split as ``B = U·sqrt(S/s)``, ``A = sqrt(S/s)·Vᵀ``
    (so ``s·B·A`` is the rank-``r`` principal part); OLoRA: ``w = QR``, ``B = Q_r``, ``A = R_r``."""
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        u, sv, vh = u[:, :r], sv[:r], vh[:r]
    else:  # randomised: k subspace iterations
        u, sv, v = torch.svd_lowrank(w, r, niter=int(init.split("_niter_")[-1]))
        vh = v.T
    root = torch.sqrt(sv / scaling)
    return torch.diag(root) @ vh, u @ torch.diag(root)  # A [r, in], B [out, r]


def _special_init(adapter: LoraAdapter, site: Site, init: str, weight: torch.Tensor) -> None:
    """Orthogonal, PiSSA, OLoRA or MiCA factors (and, for PiSSA/OLoRA, the residual base weight, kept for
    :meth:`Lora.base_update` with the initial factors), computed in fp32 as PEFT computes them."""
    kind, dtype = _init_kind(init), weight.dtype
    if kind != "orthogonal" and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedSiteError(f"site {adapter.site_name!r}: init_lora_weights={init!r} needs a float32, float16 or "
                                   f"bfloat16 base weight (as in PEFT), not {dtype}; initialise in one of those")
    with torch.no_grad():
        # PEFT's lora_A / lora_B constructors draw first: the same draws keep one torch.manual_seed giving PEFT's
        # random factors (orthogonal, pissa_niter_<k>), here and at every later site
        draw = torch.randn if site.kind == "embedding" else (lambda *shape: torch.empty(*shape).uniform_())
        draw(adapter.r, site.in_features), draw(site.out_features, adapter.r)
        if kind == "orthogonal":
            A, B = _orthogonal_factors(adapter.r, site)
        elif kind == "mica":  # B: the left singular vectors of the r smallest singular values; A = 0
            w = _as_matrix(weight, site)
            B = torch.linalg.svd(w, full_matrices=False)[0][:, -adapter.r:]
            A = torch.zeros(adapter.r, w.shape[1], device=w.device)
        else:
            w = _as_matrix(weight, site)
            A, B = _svd_factors(w, adapter.r, adapter.scaling, init)
            residual = w - (adapter.scaling * B) @ A  # PEFT's order of operations; fp32 factors, unrounded
            residual = residual.T if site.fan_in_fan_out else residual
            adapter.pending_base = residual.to(dtype).contiguous()
        # PEFT moves the factors to the base weight's dtype before autocasting them up: the same rounding
        adapter.A.copy_(A.to(device=adapter.A.device, dtype=dtype))
        adapter.B.copy_(B.to(device=adapter.B.device, dtype=dtype))
    if kind in ("pissa", "olora"):  # W = W_res + s·B0·A0: what a conversion to the original base subtracts
        adapter.register_buffer("A0", adapter.A.detach().clone(), persistent=False)
        adapter.register_buffer("B0", adapter.B.detach().clone(), persistent=False)
    if kind == "mica":
        adapter.frozen_params = frozenset({"B"})


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@PeftRegistry.register("lora")
class Lora(Method):
    config_cls = LoraConfig
    display_name = "LoRA"
    color = ("#ffd8a8", "#e8590c")
    spec_aliases = {"alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "use_rslora",
                    "init": "init_lora_weights", "dora": "use_dora"}
    default_targets = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                       "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "phi3": ["qkv_proj"],
                       "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
                       "opt": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "t5": ["q", "v"]}
    peft_default_table = "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"
    #: "parameter": a parameter adapted before all its uses, chosen by ``target_parameters`` (lora_parameters.py)
    site_kinds = frozenset({"linear", "conv", "embedding", "parameter"})
    peft_fields = frozenset({"megatron_core", "megatron_config", "qalora_group_size", "loftq_config",
                             "ensure_weight_tying", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
                             "lora_bias", "layers_to_transform", "layers_pattern", "modules_to_save",
                             "trainable_token_indices", "target_parameters", "layer_replication", "use_qalora",
                             "alora_invocation_tokens", "arrow_config", "use_bdlora"})

    @classmethod
    def validate_config(cls, config: LoraConfig) -> None:
        check_rank_alpha(config, "lora_alpha")
        if not (_finite(config.lora_dropout) and 0.0 <= config.lora_dropout < 1.0):
            raise ConfigError(f"lora_dropout must be a number in [0, 1), got {config.lora_dropout!r}")
        if not isinstance(config.use_rslora, bool):
            raise ConfigError(f"use_rslora must be True or False, got {config.use_rslora!r}")
        init = config.init_lora_weights
        if not _valid_init(init):
            hint = f" ({_REFUSED_INITS[init]})" if isinstance(init, str) and init in _REFUSED_INITS else ""
            raise ConfigError(f"init_lora_weights={init!r} is not supported{hint}; use True, False, 'gaussian', "
                              f"'orthogonal', 'pissa', 'pissa_niter_<k>' (k <= {_MAX_NITER}), 'olora' or 'mica'")
        if init == "orthogonal" and any(v % 2 for v in (config.r, *config.rank_pattern.values())):
            raise ConfigError(f"init_lora_weights='orthogonal' needs even ranks (as in PEFT), got r={config.r} and "
                              f"rank_pattern={config.rank_pattern}; use an even r")
        if config.use_dora is True and _init_kind(init) in ("pissa", "olora", "mica"):
            raise ConfigError(f"use_dora=True with init_lora_weights={init!r} is not supported; use one of them")
        if config.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias={config.bias!r} is not supported; use 'none', 'all' or 'lora_only'")
        if not isinstance(config.lora_bias, bool):
            raise ConfigError(f"lora_bias must be True or False, got {config.lora_bias!r}")
        if config.lora_bias and (config.use_dora is True or config.init_lora_weights not in (True, False)):
            raise ConfigError("lora_bias=True works with plain LoRA and init_lora_weights True or False only (as in "
                              f"PEFT), not with use_dora={config.use_dora!r}, init_lora_weights={config.init_lora_weights!r}")
        if not isinstance(config.use_dora, bool):
            raise ConfigError(f"use_dora must be True or False, got {config.use_dora!r}")
        if config.conv_reshape not in ("standard", "balanced"):
            raise ConfigError(f"conv_reshape={config.conv_reshape!r} is not supported; use 'standard' (PEFT's conv "
                              "LoRA) or 'balanced' (ALF)")
        if config.conv_reshape == "balanced" and config.use_dora:
            raise ConfigError("conv_reshape='balanced' with use_dora=True is not supported: DoRA's norm is written "
                              "for PEFT's conv factors; use one of them")
        from .trainable_tokens import check_trainable_token_indices

        check_trainable_token_indices(config.trainable_token_indices)
        _check_alora_config(config)
        _lp.validate_parameter_config(config)  # target_parameters: what PEFT's ParamWrapper refuses

    @classmethod
    def companions(cls, config: LoraConfig) -> list[Any]:
        from .trainable_tokens import token_companions  # trainable tokens beside LoRA, under its adapter name

        return token_companions(config.trainable_token_indices, config.keep_base_dtype)

    @classmethod
    def select_sites(cls, gm: fx.GraphModule, config: LoraConfig, sites: dict[str, Site], select) -> list[Site]:
        if getattr(config, "alora_invocation_tokens", None) is not None:  # before any change: needs input_ids
            _check_alora_graph(gm, config, sites)
        # target_parameters, and nn.MultiheadAttention as PEFT adapts it (lora_parameters.py)
        return _lp.select_sites(config, sites, select)

    @classmethod
    def file_names(cls, gm: fx.GraphModule, sites: list[Site]) -> dict[str, str]:
        return _lp.file_names(gm, sites)  # PEFT nests several parameters of one module: <module>.base_layer...

    @classmethod
    def check_site(cls, site: Site, config: LoraConfig) -> str | None:
        if site.kind == "parameter":
            return _lp.check_parameter_site(site)
        if site.kind == "conv" and site.groups != 1:
            return f"grouped convolution (groups={site.groups}) is not supported by LoRA"
        if site.kind == "embedding" and getattr(config, "lora_bias", False):
            return "lora_bias=True is not supported on an embedding (as in PEFT)"
        if getattr(config, "alora_invocation_tokens", None) is not None and site.kind != "linear":
            return f"aLoRA (alora_invocation_tokens) adapts linear layers only, as PEFT's aLoRA; not this {site.kind}"
        why = cls._check_init_site(site, config)
        return why or super().check_site(site, config)

    @classmethod
    def _check_init_site(cls, site: Site, config: LoraConfig) -> str | None:
        """Why ``config.init_lora_weights`` cannot initialise ``site`` (where PEFT raises, or silently differs)."""
        init = config.init_lora_weights
        kind = _init_kind(init)
        if kind == "plain":
            return None
        if site.kind == "conv" or (site.kind == "embedding" and kind != "mica"):
            return f"init_lora_weights={init!r} initialises linear layers only (PEFT raises on this {site.kind})"
        if kind == "olora" and site.fan_in_fan_out:
            return ("init_lora_weights='olora' on a weight stored [in, out] (GPT-2 Conv1D): PEFT's QR reads the weight "
                    "as stored and builds factors of the wrong shape")
        r, _ = cls._rank_alpha(config, site)
        if kind != "orthogonal" and r > min(site.in_features, site.out_features):
            return (f"init_lora_weights={init!r} with rank {r} above the weight's rank bound "
                    f"min({site.in_features}, {site.out_features}) (PEFT silently uses a smaller rank); lower r or "
                    "rank_pattern for this site")
        return None

    @classmethod
    def check_selection(cls, config: LoraConfig, sites: list[Site]) -> None:
        warn_unused_patterns(config, sites)
        if _init_kind(config.init_lora_weights) in ("pissa", "olora"):
            shared = [w for w, n in Counter(s.weight for s in sites).items() if n > 1]
            if shared:
                raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} replaces each site's weight by a "
                                  f"residual, and sites share the weight {shared[0]!r} (tied); exclude all but one")

    @classmethod
    def build(cls, site: Site, config: LoraConfig, adapter_name: str, weight: torch.Tensor) -> LoraAdapter:
        r, alpha = cls._rank_alpha(config, site)
        if site.kind == "parameter":  # A [r·E, in], B [out, r·E]: rank r per expert
            adapter = LoraAdapter(site, adapter_name, r * _lp.num_experts(site), alpha, config.use_rslora, 0.0,
                                  adapter_dtype(weight, config.keep_base_dtype), weight.device)
            _lp.setup_parameter_adapter(adapter, site, r, config)
            adapter.reset_parameters(config.init_lora_weights)
            adapter.file_init = _file_init(config.init_lora_weights)
            return adapter
        adapter = LoraAdapter(site, adapter_name, r, alpha, config.use_rslora, config.lora_dropout,
                              adapter_dtype(weight, config.keep_base_dtype), weight.device, use_dora=config.use_dora,
                              balanced=config.conv_reshape == "balanced")
        init = config.init_lora_weights
        if _init_kind(init) == "plain":
            adapter.reset_parameters(init)
        else:
            _special_init(adapter, site, init, weight)
        adapter.file_init = _file_init(init)
        if config.lora_bias:
            _add_lora_bias(adapter, site, config.init_lora_weights)
        if config.use_dora:
            adapter.init_magnitude(site, weight)
        if getattr(config, "alora_invocation_tokens", None) is not None:  # a graph constant: never saved
            adapter.register_buffer("alora_tokens", torch.tensor(config.alora_invocation_tokens, dtype=torch.long,
                                                                 device=weight.device), persistent=False)
        return adapter

    @staticmethod
    def _rank_alpha(config: LoraConfig, site: Site) -> tuple[int, float]:
        return (pattern_value(config.rank_pattern, site.name, config.r, "rank_pattern"),
                pattern_value(config.alpha_pattern, site.name, config.lora_alpha, "alpha_pattern"))

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: LoraAdapter) -> None:
        if site.kind == "parameter":
            return _lp.insert_parameter(emit, site, adapter)
        x, y = emit.call.input, emit.call.node
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        cast = adapter.A.dtype != base_dtype
        A, B = emit.param("A", Role.DOWN_WEIGHT), emit.param("B", Role.UP_WEIGHT)
        if site.kind == "embedding":
            table = emit.op(aten.t.default, A, role=Role.COMPUTE)  # [r, num] -> [num, r]
            pad = -1 if site.padding_idx is None else site.padding_idx
            a = emit.op(aten.embedding.default, table, x, pad, role=Role.DOWN)  # [..., r]
        else:
            if cast:
                x = emit.cast(x, adapter.A.dtype)
            if hasattr(adapter, "dropout"):
                x = emit.module("dropout", x, role=Role.DROPOUT)
            if adapter.balanced:
                a = _balanced_down(emit, site, A, x)
            elif site.kind == "conv":
                # A sees exactly the windows the base kernel sees: same stride, padding and dilation.
                op = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[len(site.kernel_size)]
                pad = site.padding if isinstance(site.padding, str) else list(site.padding)
                a = emit.op(op.padding if isinstance(pad, str) else op.default, x, A, None, list(site.stride), pad,
                            list(site.dilation), 1, role=Role.DOWN)  # [N, r, *spatial]
            else:
                a = emit.op(aten.linear.default, x, A, role=Role.DOWN)  # [..., r]
        a = emit.op(aten.mul.Tensor, a, emit.param("scale", Role.SCALING), role=Role.SCALE)
        up_bias = []
        if hasattr(adapter, "B_bias"):  # lora_bias: (B·a + b)·s = B·(a·s) + b·s
            up_bias = [emit.op(aten.mul.Tensor, emit.param("B_bias", Role.PARAM), emit.param("scale", Role.SCALING))]
        alora = hasattr(adapter, "alora_tokens")
        if alora and not up_bias:  # aLoRA: masked at rank r, not at the output's width (B·0 is exactly 0)
            a, alora = _alora_gate(emit, adapter, a), False
        g = None
        if adapter.use_dora:  # B's rows scaled by g (a tiny [out, r] op): the up projection gives g·B(A(x))·s
            g, weight = cls._dora_scale(emit, site, adapter, base_dtype)
            B = emit.op(aten.mul.Tensor, B, emit.op(aten.view.default, g, [-1] + [1] * (adapter.B.dim() - 1),
                                                    label="g_column"), label="gB")
        if adapter.balanced:
            b = _balanced_up(emit, site, B, a, up_bias[0] if up_bias else None)
        elif site.kind == "conv":
            op = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[len(site.kernel_size)]
            b = emit.op(op.default, a, B, *up_bias, role=Role.UP)  # 1x1: [N, out, *spatial]
        else:
            b = emit.op(aten.linear.default, a, B, *up_bias, role=Role.UP)  # [..., out]
        if alora:  # aLoRA with lora_bias: the whole update only from each row's invocation on
            b = _alora_gate(emit, adapter, b)
        if g is not None:
            emit.replace_output(cls._dora_out(emit, site, adapter, x, b, g, weight, base_dtype))
            return
        if cast:  # PEFT adds in the adapter's dtype, then casts the sum back: one rounding
            total = emit.op(aten.add.Tensor, y, b, role=Role.COMPUTE, replaces=0)
            out = emit.cast(total, base_dtype, role=Role.OUT, replaces=0)
        else:
            out = emit.op(aten.add.Tensor, y, b, role=Role.OUT, replaces=0)
        emit.replace_output(out)

    @classmethod
    def _dora_scale(cls, emit: Emit, site: Site, adapter: LoraAdapter,
                    base_dtype: torch.dtype) -> tuple[fx.Node, fx.Node]:
        """DoRA's ``g = m / ||W + s·B·A||`` per output (the magnitude's shape), exactly 1 while the adapter is off;
        and the weight it read (in the norm's dtype)."""
        dtype = adapter.A.dtype
        nd = _norm_dtype(dtype)

        def op(aten_op, *args, role: Role = Role.NORM_TERM, **kwargs) -> fx.Node:
            return emit.op(aten_op, *args, role=role, **kwargs)

        weight = emit.weight(own=True)
        if base_dtype != nd:
            weight = emit.cast(weight, nd)
        norm = dora_norm(op, weight, emit.param("A", Role.DOWN_WEIGHT), emit.param("B", Role.UP_WEIGHT),
                         emit.param("scale", Role.SCALING), site, nd, dtype)
        if nd != dtype:
            norm = emit.cast(norm, dtype)
        if adapter.magnitude.dim() > 1:  # a conv's [1, out, 1, ...]
            norm = emit.op(aten.view.default, norm, list(adapter.magnitude.shape))
        g = emit.op(aten.div.Tensor, emit.param("magnitude", Role.MAGNITUDE), norm, label="m_over_norm")
        return emit.op(aten.where.ScalarOther, emit.param("gate", Role.GATE), g, 1.0, role=Role.MAGNITUDE_SCALE), weight

    @classmethod
    def _dora_out(cls, emit: Emit, site: Site, adapter: LoraAdapter, x: fx.Node, up_g: fx.Node, g: fx.Node,
                  weight: fx.Node, base_dtype: torch.dtype) -> fx.Node:
        """DoRA's output at one call, ``y + (g - 1)·y0 + up_g`` (``up_g`` = ``g·B(A(x))·s``), returned tagged ``OUT``.

        ``x`` is the adapter's input after its cast and dropout. One new activation-sized tensor, as LoRA's own
        ``y + up``: the sum is accumulated in place (on a CPU each fresh activation-sized tensor costs page faults).
        """
        y, dtype = emit.call.node, adapter.A.dtype
        cast = dtype != base_dtype
        last = Role.COMPUTE if cast else Role.OUT
        behind_dropout = hasattr(adapter, "dora_base")
        if site.bias is None and not behind_dropout:  # y0 = y:  y + (g - 1)·y + up_g  =  g·y + up_g
            acc = emit.op(aten.mul.Tensor, y, g, replaces=0, label="gy")
        else:
            y0 = y
            if site.bias is not None:
                bias = emit.bias()
                if site.kind == "conv":
                    bias = emit.op(aten.view.default, bias, [1, -1] + [1] * len(site.kernel_size))
                y0 = emit.op(aten.sub.Tensor, y, bias, label="y0")
            if behind_dropout:
                y0 = emit.module("dora_base", y0, x, weight, label="y0")
            acc = emit.op(aten.addcmul.default, y, y0, emit.op(aten.sub.Scalar, g, 1, label="g_minus_1"), replaces=0,
                          label="y_plus_base_term")
        out = emit.op(aten.add_.Tensor, acc, up_g, role=last, replaces=0)
        if cast:  # as PEFT: computed in the adapter's dtype, the sum cast back once
            out = emit.cast(out, base_dtype, role=Role.OUT, replaces=0)
        return out

    @classmethod
    def base_update(cls, adapter: LoraAdapter, site: Site) -> torch.Tensor | None:
        return adapter.__dict__.pop("pending_base", None)  # once: the adapter keeps no copy of the weight

    @classmethod
    def initial_site_tensors(cls, adapter: LoraAdapter, site: Site) -> dict[str, torch.Tensor] | None:
        if not hasattr(adapter, "A0"):
            return None
        a, b = _KEYS[site.kind]
        return {a: adapter.A0, b: adapter.B0}

    @classmethod
    def convert_to_original_base(cls, config: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]],
                                 initial: dict[str, dict[str, torch.Tensor]]):
        """PEFT's conversion: ``W + s·(B·A - B0·A0) = W + s·[B, -B0]·[A; A0]``, a rank-``2r`` LoRA at the same
        scaling (``lora_alpha`` doubled, or times sqrt(2) under rsLoRA), ``init_lora_weights=True``."""
        if config.get("use_dora"):
            raise AdapterFileError("a DoRA adapter has no conversion to the original base (its magnitude is not "
                                   "additive); save it as it is")
        out = {}
        for site, per in tensors.items():
            a, b = ("lora_embedding_A", "lora_embedding_B") if "lora_embedding_A" in per else _KEYS["linear"]
            init = initial.get(site, {})
            if a not in init or b not in init:
                raise AdapterFileError(f"the initial adapter has no {a}/{b} for site {site!r}; it must be the adapter "
                                       "as initialised, on the same sites")
            out[site] = {**per, a: torch.cat([per[a], init[a].to(per[a].dtype)], 0),  # [2r, in]
                         b: torch.cat([per[b], -init[b].to(per[b].dtype)], 1)}  # [out, 2r]
        grow = math.sqrt(2) if config.get("use_rslora") else 2
        config = {**config, "init_lora_weights": True, "r": 2 * config["r"], "lora_alpha": config["lora_alpha"] * grow,
                  "rank_pattern": {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
                  "alpha_pattern": {k: v * grow for k, v in (config.get("alpha_pattern") or {}).items()}}
        return config, out

    @classmethod
    def fold(cls, adapter: LoraAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        _refuse_alora_merge(adapter)
        if site.kind == "parameter":
            return weight + _lp.parameter_delta(adapter, site), bias
        if adapter.use_dora:
            return adapter.dora_fold(site, weight), bias
        return adapter.add_delta(site, weight), _bias_fold(adapter, bias, 1.0)

    @classmethod
    def unfold(cls, adapter: LoraAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        _refuse_alora_merge(adapter)
        if site.kind == "parameter":
            return weight - _lp.parameter_delta(adapter, site), bias
        if adapter.use_dora:
            return adapter.dora_fold(site, weight, undo=True), bias
        return adapter.add_delta(site, weight, -1.0), _bias_fold(adapter, bias, -1.0)

    # ---------------------------------------------------------------------------------- mixed batch
    @classmethod
    def insert_mixed(cls, emit: Emit, site: Site, slots: list[LoraAdapter | None]) -> None:
        # Row b uses slot index[b]: each slot's A and B are padded to the largest rank (zero rows add nothing),
        # stacked, and gathered per row, so the matmuls cost one adapter's rank per token, whatever the count.
        present = [m for m in slots if m is not None]
        if site.kind == "parameter":
            raise UnsupportedSiteError(f"LoRA on parameter {site.weight!r} has no mixed-batch form (a batch row cannot "
                                       "pick its own weight); serve one adapter at a time (fxpeft.set_adapter) or merge")
        dora = [m.adapter_name for m in present if m.use_dora]
        biased = [m.adapter_name for m in present if hasattr(m, "B_bias")]
        balanced = [m.adapter_name for m in present if m.balanced]
        if balanced:
            raise UnsupportedSiteError(f"adapter(s) {balanced} use conv_reshape='balanced' at {site.name!r}, which has "
                                       "no mixed-batch form; serve them one at a time (fxpeft.set_adapter) or merge them")
        if biased:
            raise UnsupportedSiteError(f"adapter(s) {biased} use lora_bias at {site.name!r}, which has no mixed-batch "
                                       "form yet; serve them one at a time (fxpeft.set_adapter) or merge them")
        if dora:
            raise UnsupportedSiteError(
                f"adapter(s) {dora} use DoRA at {site.name!r}, which has no mixed-batch form (PEFT refuses "
                "adapter_names with DoRA too): each adapter rescales the whole output by its own weight norm. Serve a "
                "DoRA adapter alone (fxpeft.set_adapter) or merge it")
        rank, ref = max(m.A.shape[0] for m in present), present[0]
        base_dtype = emit.gm.get_parameter(site.weight).dtype

        def stacked(attr: str, dim: int, role: Role) -> fx.Node:  # zero-padded to the rank; None: zeros
            return emit.stack_slots([None if m is None else emit.param_of(m, attr, role) for m in slots], rank, dim,
                                    role)

        A = stacked("A", 0, Role.DOWN_WEIGHT)  # [K+1, R, in(, *k)]
        B = stacked("B", 1, Role.UP_WEIGHT)  # [K+1, out, R(, 1..)]
        no_scale = emit.op(aten.zeros_like.default, emit.param_of(ref, "mixed_scale"), role=Role.SCALING)
        scales = emit.op(aten.stack.default, [no_scale if m is None else emit.param_of(m, "mixed_scale")
                                              for m in slots], role=Role.SCALING)  # [K+1]
        idx = emit.index
        A_rows = emit.op(aten.index_select.default, A, 0, idx, role=Role.DOWN_WEIGHT)  # [B, R, in(, *k)]
        B_rows = emit.op(aten.index_select.default, B, 0, idx, role=Role.UP_WEIGHT)  # [B, out, R(, 1..)]
        s_rows = emit.op(aten.index_select.default, scales, 0, idx, role=Role.SCALING)  # [B]
        x, y = emit.call.input, emit.call.node
        if site.kind == "embedding":
            delta = _mixed_embedding(emit, site, x, A, s_rows, B_rows)
        elif site.kind == "conv":
            if ref.A.dtype != base_dtype:
                x = emit.cast(x, ref.A.dtype)
            delta = _mixed_conv(emit, site, x, A_rows, s_rows, B_rows, slots)
        else:
            rows = emit.rows(x, site.in_features)  # [B, L, in]
            if ref.A.dtype != base_dtype:
                rows = emit.cast(rows, ref.A.dtype)
            rows = _mixed_dropout(emit, rows, slots)
            a = emit.op(aten.bmm.default, rows, emit.op(aten.transpose.int, A_rows, 1, 2), role=Role.DOWN)  # [B, L, R]
            a = emit.op(aten.mul.Tensor, a, emit.op(aten.view.default, s_rows, [-1, 1, 1]), role=Role.SCALE)
            a = _alora_mixed_gate(emit, slots, a)  # aLoRA rows: each from its own invocation on (at rank R)
            delta = emit.op(aten.bmm.default, a, emit.op(aten.transpose.int, B_rows, 1, 2), role=Role.UP)  # [B, L, out]
        if ref.A.dtype != base_dtype:  # as in one adapter's graph: add in the adapter's dtype, cast the sum back
            total = emit.op(aten.add.Tensor, y, emit.op(aten.reshape.default, delta, emit.op(aten.sym_size.default, y)),
                            role=Role.COMPUTE, replaces=0)
            out = emit.cast(total, base_dtype, role=Role.OUT, replaces=0)
        else:
            out = emit.op(aten.add.Tensor, y, emit.op(aten.reshape.default, delta, emit.op(aten.sym_size.default, y)),
                          role=Role.OUT, replaces=0)
        emit.replace_output(out)

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: LoraConfig, site: Site) -> dict[str, tuple[int, ...]]:
        r, _ = cls._rank_alpha(config, site)
        if site.kind == "parameter":
            return _lp.parameter_shapes(config, site, r)
        a, b = _KEYS[site.kind]
        if site.kind == "conv" and config.conv_reshape == "balanced":
            shapes = dict(zip((a, b), _balanced_shapes(site, r)))
        elif site.kind == "conv":
            ones = (1,) * len(site.kernel_size)
            shapes = {a: (r, site.in_features, *site.kernel_size), b: (site.out_features, r, *ones)}
        else:
            shapes = {a: (r, site.in_features), b: (site.out_features, r)}  # embedding: (r, num), (dim, r)
        if config.use_dora:
            shapes[_MAGNITUDE_KEY] = _magnitude_shape(site)
        if getattr(config, "lora_bias", False) and site.kind != "embedding":
            shapes[_BIAS_KEY] = (site.out_features,)
        return shapes

    @classmethod
    def site_tensors(cls, adapter: LoraAdapter, site: Site) -> dict[str, torch.Tensor]:
        if site.kind == "parameter":
            return _lp.parameter_tensors(adapter)
        a, b = _KEYS[site.kind]  # only the adapter's rank: rows past it are room for a hot-swap
        tensors = {a: adapter.A.detach()[: adapter.r], b: adapter.B.detach()[:, : adapter.r]}
        if adapter.use_dora:
            tensors[_MAGNITUDE_KEY] = adapter.magnitude.detach()
        if hasattr(adapter, "B_bias"):
            tensors[_BIAS_KEY] = adapter.B_bias.detach()
        return tensors

    @classmethod
    def load_site_tensors(cls, adapter: LoraAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        a, b = _KEYS[site.kind]
        init = getattr(adapter, "file_init", True)
        if isinstance(init, str) and init.startswith("pissa_niter_"):
            warnings.warn(f"{site.name}: the file's init_lora_weights={init!r} re-ran on load (as in PEFT) with a "
                          "randomised SVD, so the base residual differs from the one the adapter was trained on; "
                          "load a converted file instead (save_adapter(..., convert_to_original_base=True), or PEFT's "
                          "path_initial_model_for_weight_conversion)")
        with torch.no_grad():
            adapter.A.copy_(tensors[a].reshape(adapter.A.shape))
            adapter.B.copy_(tensors[b].reshape(adapter.B.shape))
            if adapter.use_dora:
                adapter.magnitude.copy_(tensors[_MAGNITUDE_KEY].reshape(adapter.magnitude.shape))
            if hasattr(adapter, "B_bias"):
                adapter.B_bias.copy_(tensors[_BIAS_KEY])

    @classmethod
    def prepare_swap(cls, adapter: LoraAdapter, site: Site, capacity: int | None) -> None:
        _lp.refuse_parameter_sites({site.name: site}, [site.name], "hot-swapping")
        # Zero rows of A and zero columns of B add nothing: the outputs stay, the room grows to ``capacity``.
        extra = (capacity or adapter.r) - adapter.A.shape[0]
        if extra <= 0:
            return
        with torch.no_grad():
            A = torch.cat([adapter.A, adapter.A.new_zeros(extra, *adapter.A.shape[1:])], 0)  # [R, in, *k]
            B = torch.cat([adapter.B, adapter.B.new_zeros(adapter.B.shape[0], extra, *adapter.B.shape[2:])], 1)
        adapter.A, adapter.B = nn.Parameter(A, adapter.A.requires_grad), nn.Parameter(B, adapter.B.requires_grad)

    @classmethod
    def swap_in(cls, adapter: LoraAdapter, site: Site, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
        _lp.refuse_parameter_sites({site.name: site}, [site.name], "hot-swapping")
        a, b = _KEYS[site.kind]
        r, alpha = cls._rank_alpha(config, site)
        room = adapter.A.shape[0]
        if config.use_dora != adapter.use_dora:
            raise AdapterFileError(f"{site.name}: the file has use_dora={config.use_dora}, the adapter "
                                   f"use_dora={adapter.use_dora}; a hot-swap keeps the variant: use load_adapter")
        file_alora, own_alora = cls.site_settings(config, site)["alora"], cls.adapter_settings(adapter)["alora"]
        if file_alora != own_alora:  # the invocation tokens are graph constants: a swap cannot change them
            raise AdapterFileError(f"{site.name}: the file has alora_invocation_tokens={file_alora}, the adapter "
                                   f"{own_alora}; a hot-swap keeps the variant: use load_adapter")
        if site.kind == "conv" and (config.conv_reshape == "balanced") != adapter.balanced:
            raise AdapterFileError(f"{site.name}: the file has conv_reshape={config.conv_reshape!r}, the adapter "
                                   f"{'balanced' if adapter.balanced else 'standard'}; a hot-swap keeps the variant: "
                                   "use load_adapter")
        file_init, own_init = _file_init(config.init_lora_weights), getattr(adapter, "file_init", True)
        residual = {_init_kind(file_init), _init_kind(own_init)} & {"pissa", "olora"}
        if file_init != own_init or residual and (str(file_init).startswith("pissa_niter_") or
                                                  (r, alpha) != (adapter.r, adapter.lora_alpha)):
            raise AdapterFileError(f"{site.name}: the file has init_lora_weights={file_init!r}, the adapter "
                                   f"{own_init!r} (r={adapter.r}, alpha={adapter.lora_alpha}); a hot-swap keeps the base "
                                   "weight, which PiSSA/OLoRA make a residual of their own: use load_adapter")
        if (_BIAS_KEY in tensors) != hasattr(adapter, "B_bias"):
            raise AdapterFileError(f"{site.name}: the file has lora_bias={_BIAS_KEY in tensors}, the adapter not; a "
                                   "hot-swap keeps the variant: use load_adapter")
        if r > room:
            raise AdapterFileError(f"{site.name}: the file's rank {r} is larger than the adapter's room {room}; call "
                                   f"fxpeft.prepare_for_hotswap(gm, target_rank={r}) before compiling")
        with torch.no_grad():
            adapter.A.zero_(), adapter.B.zero_()
            adapter.A[:r].copy_(tensors[a].reshape(r, *adapter.A.shape[1:]))
            adapter.B[:, :r].copy_(tensors[b].reshape(adapter.B.shape[0], r, *adapter.B.shape[2:]))
            if adapter.use_dora:
                adapter.magnitude.copy_(tensors[_MAGNITUDE_KEY].reshape(adapter.magnitude.shape))
            if hasattr(adapter, "B_bias"):
                adapter.B_bias.copy_(tensors[_BIAS_KEY])
        adapter.r, adapter.lora_alpha, adapter.use_rslora = r, alpha, config.use_rslora
        adapter.scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        adapter.gate_changed(bool(adapter.gate))  # the run-time scale buffer takes the new scaling

    @classmethod
    def site_settings(cls, config: LoraConfig, site: Site) -> dict[str, Any]:
        r, alpha = cls._rank_alpha(config, site)
        tokens = getattr(config, "alora_invocation_tokens", None)
        return {"r": r, "alpha": alpha, "use_dora": config.use_dora, "init": _file_init(config.init_lora_weights),
                "balanced": site.kind == "conv" and config.conv_reshape == "balanced",
                "alora": None if tokens is None else [int(t) for t in tokens]}

    @classmethod
    def adapter_settings(cls, adapter: LoraAdapter) -> dict[str, Any]:
        tokens = getattr(adapter, "alora_tokens", None)
        return {"r": adapter.r, "alpha": adapter.lora_alpha, "use_dora": adapter.use_dora,
                "init": getattr(adapter, "file_init", True), "balanced": adapter.balanced,
                "alora": None if tokens is None else tokens.tolist()}

    @classmethod
    def config_fields(cls, adapters: dict[str, LoraAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        rslora = {m.use_rslora for m in adapters.values()}
        if len(rslora) > 1:
            raise AdapterFileError("the adapter's sites disagree on use_rslora; one PEFT config has one use_rslora")
        dora = {m.use_dora for m in adapters.values()}
        if len(dora) > 1:
            raise AdapterFileError("the adapter's sites disagree on use_dora; one PEFT config has one use_dora")
        lora_bias = {hasattr(m, "B_bias") for m in adapters.values()}
        if len(lora_bias) > 1:
            raise AdapterFileError("the adapter's sites disagree on lora_bias; one PEFT config has one lora_bias")
        inits = {getattr(m, "file_init", True) for m in adapters.values()}
        if len(inits) > 1:
            raise AdapterFileError(f"the adapter's sites disagree on init_lora_weights ({sorted(map(str, inits))}); one "
                                   "PEFT config has one init_lora_weights")
        balanced = {m.balanced for n, m in adapters.items() if sites[n].kind == "conv"}
        if len(balanced) > 1:
            raise AdapterFileError("the adapter's conv sites disagree on conv_reshape; one config has one conv_reshape")
        # only a balanced adapter writes the field: PEFT warns about any field it does not know
        reshape = {"conv_reshape": "balanced"} if balanced == {True} else {}
        alora = {tuple(m.alora_tokens.tolist()) if hasattr(m, "alora_tokens") else None for m in adapters.values()}
        if len(alora) > 1:
            raise AdapterFileError("the adapter's sites disagree on alora_invocation_tokens; one PEFT config has one")
        invocation = alora.pop()
        if invocation is not None:
            reshape["alora_invocation_tokens"] = list(invocation)
        r = Counter(m.r for m in adapters.values()).most_common(1)[0][0]
        alpha = Counter(m.lora_alpha for m in adapters.values()).most_common(1)[0][0]
        dropouts = [getattr(getattr(m, "dropout", None), "p", 0.0) for m in adapters.values()]
        fields = {"r": r, "lora_alpha": alpha, "lora_dropout": Counter(dropouts).most_common(1)[0][0],
                "use_rslora": rslora.pop(), "init_lora_weights": inits.pop(), "bias": "none", "use_dora": dora.pop(),
                "lora_bias": lora_bias.pop(), "layers_to_transform": None, "layers_pattern": None,
                "fan_in_fan_out": any(sites[n].module_type == "Conv1D" for n in adapters),
                "rank_pattern": keys_for({n: m.r for n, m in adapters.items()}, r),
                "alpha_pattern": keys_for({n: m.lora_alpha for n, m in adapters.items()}, alpha), **reshape}
        return _lp.parameter_config_fields(fields, sites, list(adapters), target_modules)  # target_parameters

    @classmethod
    def differs_in_peft(cls, site: Site) -> str | None:
        if site.kind == "conv" and any(d != 1 for d in (site.dilation or ())):
            return ("conv LoRA on dilated convolution(s): PEFT's lora_A conv ignores the base dilation (it uses 1), "
                    "fxpeft's uses it")
        return None

    @classmethod
    def refused_keys(cls) -> dict[str, str]:
        return {"lora_A.bias": "a bias on lora_A (not PEFT's lora_bias, which is on lora_B)",
                "lora_embedding_A.bias": "lora_bias=True on an embedding",
                "lora_E": "AdaLoRA", "trainable_tokens_delta": "trainable_token_indices"}

    @classmethod
    def config_from_peft(cls, fields: dict[str, Any]) -> LoraConfig:
        fields = dict(fields)
        own = {f.name for f in dataclasses.fields(cls.config_cls)}
        for key, feature in _VARIANT_FIELDS.items():
            v = fields.get(key)
            if key not in own and not is_unset(v):
                raise AdapterFileError(f"the adapter sets {key}={v!r}: {feature}, a LoRA variant fxpeft does not "
                                       f"implement; fxpeft refuses it rather than compute plain LoRA instead")
        init = fields.get("init_lora_weights", True)
        if isinstance(init, str) and init in _REFUSED_INITS:
            raise AdapterFileError(f"the adapter sets init_lora_weights={init!r}, which fxpeft does not compute: "
                                   f"{_REFUSED_INITS[init]}")
        if fields.get("target_modules") is None and fields.get("target_parameters"):
            fields["target_modules"] = []  # parameters only
        return config_from_fields(cls, fields)  # PiSSA/OLoRA re-run on load, as in PEFT: the base becomes the residual

    # ---------------------------------------------------------------------------------- weighted merges
    @classmethod
    def combine(cls, sources: list[dict[str, LoraAdapter]], weights: list[float], combination: Combination,
                sites: dict[str, Site]) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]]]:
        """PEFT's ``add_weighted_adapter`` for LoRA (the formulas: :func:`fxpeft.add_weighted_adapter`).

        The new rank is PEFT's: the common rank (``linear``, ``ties``, ``dare_*``, ``magnitude_prune``), the sum of
        the ranks (``cat``), or ``svd_rank`` / the largest rank (``*svd``), where an adapter's rank is its largest
        over its sites. Every site gets that rank (zero-padded where its combination has fewer) and
        ``lora_alpha = r`` without rsLoRA: scaling 1, whatever ``use_rslora`` the sources have (PEFT copies the
        first source's flag, and is then ``sqrt(r)`` too large). Dropout and dtype follow the first source.
        """
        _lp.refuse_parameter_sites(sites, [n for src in sources for n in src], "add_weighted_adapter")
        biased = sorted({m.adapter_name for src in sources for m in src.values() if hasattr(m, "B_bias")})
        balanced = sorted({m.adapter_name for src in sources for m in src.values() if m.balanced})
        if balanced:
            raise ConfigError(f"adapter(s) {balanced} use conv_reshape='balanced'; add_weighted_adapter combines "
                              "adapters without it")
        if biased:
            raise ConfigError(f"adapter(s) {biased} use lora_bias; add_weighted_adapter combines adapters without it")
        dora = sorted({m.adapter_name for src in sources for m in src.values() if m.use_dora})
        if dora:
            raise ConfigError(f"adapter(s) {dora} use DoRA; add_weighted_adapter combines plain LoRA adapters only: "
                              "a weighted sum of B·A leaves the trained magnitudes without a meaning (PEFT drops "
                              "them: its new adapter keeps the magnitude of its own initialisation)")
        ranks = [max(m.r for m in src.values()) for src in sources]
        if combination.combination_type == "cat":
            rank = sum(ranks)
        else:
            rank = (combination.svd_rank or max(ranks)) if combination.svd else max(ranks)
        tensors = {}
        for name, site in sites.items():
            here = [(src[name], w) for src, w in zip(sources, weights) if name in src]
            A, B = cls._combine_site(here, combination, rank, site)
            a, b = _KEYS[site.kind]
            tensors[name] = {a: A, b: B}
        first = list(sources[0].values())
        dropout = max(getattr(getattr(m, "dropout", None), "p", 0.0) for m in first)  # embeddings have none
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, use_rslora=False,
                            keep_base_dtype=first[0].A.dtype in (torch.float16, torch.bfloat16))
        return config, tensors

    @staticmethod
    def _combine_site(here: list[tuple[LoraAdapter, float]], combination: Combination, rank: int,
                      site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        """One site's new ``A [rank, in, *k]`` and ``B [out, rank, *1]`` in PEFT's layout (embedding: A ``[rank, num]``,
        B ``[dim, rank]``, the roles PEFT's ``lora_embedding_A/B`` have), from the adapters present there."""
        # The live factors, in fp32: rows of A past ``r`` (columns of B) are hot-swap room, zeros.
        fac = [(m.A.detach()[: m.r].float(), m.B.detach()[:, : m.r].float(), m.scaling, w) for m, w in here]
        if combination.combination_type == "cat":  # exact: [A1·w1·s1; A2·w2·s2] and [B1 B2]
            A = torch.cat([A * w * s for A, _, s, w in fac], 0)
            B = torch.cat([B for _, B, _, _ in fac], 1)
        elif combination.svd:  # the full deltas [out, in·k] ([dim, num] for an embedding), merged, truncated
            deltas = [(B.flatten(1) @ A.flatten(1)) * s for A, B, s, _ in fac]
            up, down = combination.low_rank(combination.merge(deltas, [w for *_, w in fac]), rank)
            return down.reshape(rank, *fac[0][0].shape[1:]), up.reshape(up.shape[0], rank, *fac[0][1].shape[2:])
        else:
            if len({A.shape[0] for A, *_ in fac}) > 1:
                raise ConfigError(
                    f"combination_type={combination.combination_type!r} merges the A and B factors entry by entry, "
                    f"so the adapters at site {site.name!r} must share a rank; they have ranks "
                    f"{[A.shape[0] for A, *_ in fac]}. Use 'cat', 'svd' or a '*_svd' type, which take any ranks")
            # PEFT's approximation of sum(w·s·B@A): A's and B's merged separately, sqrt(|w·s|) on each, the sign on A
            ws = [w * s for *_, s, w in fac]
            A = combination.merge([A for A, *_ in fac], [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws])
            B = combination.merge([B for _, B, *_ in fac], [math.sqrt(abs(x)) for x in ws])
        extra = rank - A.shape[0]  # zero rows of A / columns of B add nothing
        A = torch.cat([A, A.new_zeros(extra, *A.shape[1:])], 0)
        B = torch.cat([B, B.new_zeros(B.shape[0], extra, *B.shape[2:])], 1)
        return A, B


class RowDropout(nn.Module):
    """Dropout with a probability per batch row, gathered from a table by the row's adapter index: a mixed
    batch applies each row's own adapter's dropout, as serving the adapters one by one would."""

    def __init__(self, p: list[float]) -> None:
        super().__init__()
        self.register_buffer("p", torch.tensor(p, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        p = self.p.to(x.dtype)[index].view(-1, *([1] * (x.dim() - 1)))  # [B, 1, ...]
        keep = torch.rand_like(x) >= p
        return x * keep / (1 - p)


def _mixed_dropout(emit: Emit, x: fx.Node, slots: list[LoraAdapter | None]) -> fx.Node:
    ps = [float(getattr(getattr(m, "dropout", None), "p", 0.0)) for m in slots]
    if not any(ps):
        return x
    return emit.add_module("mixed_dropout", RowDropout(ps), x, emit.index, role=Role.DROPOUT)


def _mixed_embedding(emit: Emit, site: Site, ids: fx.Node, A: fx.Node, s_rows: fx.Node, B_rows: fx.Node) -> fx.Node:
    # One lookup in every slot's table at once: row b's token t reads entry index[b] * num + ids[b, t].
    num = site.in_features
    table = emit.op(aten.permute.default, A, [0, 2, 1])  # [K+1, R, num] -> [K+1, num, R]
    table = emit.op(aten.reshape.default, table, [-1, emit.op(aten.sym_size.int, A, 1)])  # [(K+1)*num, R]
    batch = emit.op(aten.sym_size.int, emit.batch_source, 0)
    ids = emit.op(aten.reshape.default, ids, [batch, -1])  # [B, L]
    offset = emit.op(aten.mul.Tensor, emit.op(aten.view.default, emit.index, [-1, 1]), num)  # [B, 1]
    a = emit.op(aten.embedding.default, table, emit.op(aten.add.Tensor, ids, offset), role=Role.DOWN)  # [B, L, R]
    a = emit.op(aten.mul.Tensor, a, emit.op(aten.view.default, s_rows, [-1, 1, 1]), role=Role.SCALE)
    return emit.op(aten.bmm.default, a, emit.op(aten.transpose.int, B_rows, 1, 2), role=Role.UP)  # [B, L, dim]


def _mixed_conv(emit: Emit, site: Site, x: fx.Node, A_rows: fx.Node, s_rows: fx.Node, B_rows: fx.Node,
                slots: list[LoraAdapter | None]) -> fx.Node:
    # Row b's A is a conv over row b alone: a grouped conv with one group per row, on the rows stacked as
    # channels. B (1x1) is then a batched matmul over the flattened positions.
    dims = len(site.kernel_size)
    op = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[dims]
    batch = emit.op(aten.sym_size.int, x, 0)
    x = _mixed_dropout(emit, x, slots)
    xg = emit.op(aten.unsqueeze.default, emit.op(aten.flatten.using_ints, x, 0, 1), 0)  # [1, B*C, *sp]
    Ag = emit.op(aten.flatten.using_ints, A_rows, 0, 1)  # [B*R, C, *k]
    pad = site.padding if isinstance(site.padding, str) else list(site.padding)
    a = emit.op(op.padding if isinstance(pad, str) else op.default, xg, Ag, None, list(site.stride), pad,
                list(site.dilation), batch, role=Role.DOWN)  # [1, B*R, *sp']
    a = emit.op(aten.view.default, a, [batch, emit.op(aten.sym_size.int, A_rows, 1), -1])  # [B, R, P]
    a = emit.op(aten.mul.Tensor, a, emit.op(aten.view.default, s_rows, [-1, 1, 1]), role=Role.SCALE)
    Bm = emit.op(aten.flatten.using_ints, B_rows, 2)  # [B, out, R]
    return emit.op(aten.bmm.default, Bm, a, role=Role.UP)  # [B, out, P]


def check_rank_alpha(config: Any, alpha_field: str) -> None:
    """Check ``r``, the alpha field and ``rank_pattern`` / ``alpha_pattern`` (LoRA, LoHa and LoKr share them)."""
    if not _positive_int(config.r):
        raise ConfigError(f"r must be a positive integer, got {config.r!r}; set e.g. r=8")
    alpha = getattr(config, alpha_field)
    if not _finite(alpha):
        raise ConfigError(f"{alpha_field} must be a finite number, got {alpha!r}")
    for name, pattern, ok, what in (("rank_pattern", config.rank_pattern, _positive_int, "a positive integer"),
                                    ("alpha_pattern", config.alpha_pattern, _finite, "a finite number")):
        if not isinstance(pattern, dict):
            raise ConfigError(f"{name} must be a dict {{pattern: value}}, got {pattern!r}")
        for k, v in pattern.items():
            compile_pattern(str(k), field=f"{name} key")
            if not ok(v):
                raise ConfigError(f"{name}[{k!r}] must be {what}, got {v!r}")


def warn_unused_patterns(config: Any, sites: list[Site]) -> None:
    """Warn about ``rank_pattern`` / ``alpha_pattern`` keys that match none of the targeted sites."""
    for name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, name):
            if not any(pattern_key_match(str(key), s.name, field=name) for s in sites):
                warnings.warn(f"{name} key {key!r} matches none of the {len(sites)} targeted sites; it has no effect")


def pattern_value(pattern: dict[str, Any], name: str, default: Any, field_name: str) -> Any:
    """PEFT's per-site override lookup: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``
    (matched by a linear-time engine: the keys may come from an untrusted file)."""
    for key, value in pattern.items():
        if pattern_key_match(str(key), name, field=field_name):
            return value
    return default


# ---------------------------------------------------------------------------------- aLoRA (activated LoRA)
# PEFT finds each row's invocation in Python (``calculate_alora_offsets``) and passes ``alora_offsets``: the start
# of the last occurrence counted back from the end of the row, padding included (offset = T - start), so its mask
# ``t >= T - offset`` is ``t >= start``. fxpeft computes ``start`` in the graph from ``input_ids`` with tensor ops
# only (no loop over rows), so the same graph runs under torch.compile and in a .pt2 export.

#: the ``input_ids`` placeholder found per graph (every aLoRA site of a rewrite reads the same one)
_ALORA_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_alora_config(config: LoraConfig) -> None:
    """Refuse aLoRA settings PEFT cannot express or fxpeft does not compute (before any change to the graph)."""
    tokens = getattr(config, "alora_invocation_tokens", None)
    if tokens is None:
        return
    if (not isinstance(tokens, (list, tuple)) or not tokens
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)):
        raise ConfigError(f"alora_invocation_tokens must be a non-empty list of token ids (ints >= 0), got {tokens!r}; "
                          "pass the tokenized invocation string, e.g. tokenizer.encode(text, add_special_tokens=False)")
    if config.use_dora:
        raise ConfigError("alora_invocation_tokens with use_dora=True is not supported (PEFT has no such variant); "
                          "use one of them")
    if config.target_parameters:
        raise ConfigError("alora_invocation_tokens with target_parameters is not supported: aLoRA gates a layer's "
                          "output per token, a parameter site changes the weight; use target_modules")


def _ids_placeholder(gm: fx.GraphModule, sites: dict[str, Site]) -> tuple[fx.Node | None, Site | None]:
    """The graph input that feeds the input embedding (``input_ids``, through a few views), and that embedding."""
    from .trainable_tokens import _input_embedding, input_placeholder  # HF's get_input_embeddings, at trace

    emb = sites.get(_input_embedding(gm, sites))
    if emb is None or emb.kind != "embedding":
        return None, None
    return next((p for c in emb.calls if (p := input_placeholder(c.input)) is not None), None), emb


def _check_alora_graph(gm: fx.GraphModule, config: LoraConfig, sites: dict[str, Site]) -> None:
    """The graph must take ``input_ids`` (the offsets come from it), and the tokens must be in its vocabulary."""
    ids, emb = _ids_placeholder(gm, sites)
    if ids is None:
        raise UnsupportedSiteError("aLoRA (alora_invocation_tokens) finds each row's invocation in input_ids, and this "
                                   "graph has no input feeding its input embedding; trace the model with input_ids "
                                   "(not inputs_embeds)")
    vocab = emb.weight_shape[0]
    bad = [t for t in config.alora_invocation_tokens if t >= vocab]
    if bad:
        raise ConfigError(f"alora_invocation_tokens {bad} are outside the vocabulary of {emb.name!r} ({vocab} tokens); "
                          "tokenize the invocation string with this model's tokenizer")
    _ALORA_IDS[gm] = ids


def _alora_ids(gm: fx.GraphModule) -> fx.Node:
    """The ``input_ids`` placeholder of ``gm`` (cached by :func:`_check_alora_graph`; found again after a reload)."""
    ids = _ALORA_IDS.get(gm)
    if ids is None or ids.graph is not gm.graph:
        from fxpeft.sites import find_sites

        ids, _ = _ids_placeholder(gm, find_sites(gm, {"embedding"}))
        if ids is None:
            raise UnsupportedSiteError("aLoRA needs the graph input feeding the input embedding (input_ids); this "
                                       "graph has none: trace the model with input_ids")
        _ALORA_IDS[gm] = ids
    return ids


#: the forward keyword of PEFT's per-row offsets (``model(..., alora_offsets=...)``), optional in fxpeft's graph
ALORA_OFFSETS = "alora_offsets"


def check_alora_offsets(offsets: Any, name: str, batch_source: Any) -> torch.Tensor | None:
    """The graph's first step on ``alora_offsets``: None (the graph computes the offsets), or one int per row."""
    if offsets is None:
        return None
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.is_floating_point() \
            or offsets.is_complex() or offsets.dtype is torch.bool:
        got = (f"a {offsets.dtype} tensor of shape {tuple(offsets.shape)}" if isinstance(offsets, torch.Tensor)
               else repr(offsets))
        raise InputShapeError(f"{name} must be a 1-D integer tensor with one offset per batch row (PEFT's convention: "
                              f"counted back from the end of the row, padding included; 0 for no invocation), got {got}")
    if isinstance(batch_source, torch.Tensor) and batch_source.dim() >= 1:
        torch._check(offsets.shape[0] == batch_source.shape[0], lambda: f"{name} needs one offset per batch row")
    return offsets.long()


def alora_start(offsets: torch.Tensor | None, start: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each row's activation start ``[B, 1]`` (-1: none): the graph's own ``start``, or ``T - offsets`` where the
    caller passed PEFT's per-row offsets (an offset <= 0 is a row without invocation; one past T adapts it all)."""
    if offsets is None:
        return start
    off = offsets.to(start.device).view(-1, 1)  # [B, 1]
    return torch.where(off > 0, (ids.shape[1] - off).clamp_min(0), -1)


def alora_mask(input_ids: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Eager reference of the graph's aLoRA mask: ``[B, T, 1]``, True from the start of the last occurrence of
    ``tokens`` in each row to the end, all False in a row without it (or from PEFT's ``offsets``, ``T - start``)."""
    return alora_on(input_ids, tokens, offsets).unsqueeze(-1)  # [B, T, 1]


def alora_on(input_ids: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor | None,
             values: tuple[int, ...] | None = None) -> torch.Tensor:
    """``[B, T]`` bool, True from each row's invocation on: the graph's node at every aLoRA site.

    Every site of a call computes the same mask from the same ``input_ids`` (each holds its own copy of the
    invocation tokens), so in eager mode the first site keeps its mask in the call's scratch
    (:mod:`fxpeft.scope`: it lives for this call only) and the other sites read it, keyed by the inputs (and their
    in-place versions) and the tokens' ``values`` (the graph passes them as a constant, so no site reads the
    tokens back from the device). Outside a graph call, under ``torch.compile`` or export, it is the plain
    computation (traced once per site; Inductor merges them).
    """
    scratch = call_scratch() if not torch.compiler.is_compiling() else None
    key = None
    if (scratch is not None and type(input_ids) is torch.Tensor and not input_ids.is_inference()
            and (offsets is None or type(offsets) is torch.Tensor and not offsets.is_inference())):
        key = ("alora_on", id(input_ids), input_ids._version,
               None if offsets is None else (id(offsets), offsets._version),
               values if values is not None else tuple(tokens.tolist()))
        hit = scratch.get(key)
        if hit is not None:
            return hit
    n = tokens.numel()
    padded = F.pad(input_ids, (0, n - 1), value=-1)  # [B, T + n - 1]: every position starts a window
    match = (padded.unfold(1, n, 1) == tokens).all(-1)  # [B, T]
    pos = torch.ones_like(input_ids).cumsum(1) - 1  # [B, T]: 0..T-1, without reading T (a dynamic dim)
    start = alora_start(offsets, torch.where(match, pos, -1).amax(1, keepdim=True), input_ids)  # [B, 1]; -1: none
    on = (pos >= start) & (start >= 0)
    if key is not None:
        scratch[key] = on
    return on


def _alora_on(emit: Emit, adapter: LoraAdapter, tokens: fx.Node) -> fx.Node:
    """:func:`alora_on` as a node, ``[B, T]`` bool, for ``adapter``'s invocation ``tokens``: from the offsets input
    when the caller passes one, else from ``input_ids``."""
    offsets = emit.input(ALORA_OFFSETS, check_alora_offsets)  # None unless the caller passes PEFT's offsets
    values = tuple(adapter.alora_tokens.tolist())  # a constant of the graph (the config's tokens)
    return emit.function(alora_on, _alora_ids(emit.gm), tokens, offsets, values, label="alora_on")


def _alora_mask_node(emit: Emit, on: fx.Node) -> fx.Node:
    """``on`` ``[B, T]`` shaped for the update: ``[B, T, 1]``, or ``[B·T, 1]`` for an addmm on flattened tokens."""
    val = emit.call.node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() == 2:  # GPT-2's Conv1D: [B·T, out]
        return emit.op(aten.reshape.default, on, [-1, 1], label="alora_mask")  # [B·T, 1]
    return emit.op(aten.unsqueeze.default, on, -1, label="alora_mask")  # [B, T, 1]


def _alora_gate(emit: Emit, adapter: LoraAdapter, up: fx.Node) -> fx.Node:
    """``up`` (the scaled down-projection ``[B, T, r]``, or the update ``[B, T, out]``) zeroed before each row's
    invocation."""
    on = _alora_on(emit, adapter, emit.param("alora_tokens", label="alora_tokens"))
    return emit.op(aten.where.ScalarOther, _alora_mask_node(emit, on), up, 0.0, role=Role.UP, label="alora_up")


def _alora_mixed_gate(emit: Emit, slots: list[LoraAdapter | None], delta: fx.Node) -> fx.Node:
    """A mixed batch's ``delta`` ``[B, L, R]`` with each aLoRA row zeroed before its own invocation: one mask per
    aLoRA slot (its own tokens), all True for a plain slot, and each row picks its slot's mask."""
    if not any(m is not None and hasattr(m, "alora_tokens") for m in slots):
        return delta
    masks, ones = [], None
    for m in slots:
        if m is not None and hasattr(m, "alora_tokens"):
            masks.append(_alora_on(emit, m, emit.param_of(m, "alora_tokens")))  # [B, T]
            continue
        if ones is None:
            ones = emit.op(aten.ones_like.default, _alora_ids(emit.gm), dtype=torch.bool, label="alora_plain")
        masks.append(ones)
    stacked = emit.op(aten.stack.default, masks, 1, label="alora_slot_masks")  # [B, K+1, T]
    pick = emit.op(aten.view.default, emit.index, [-1, 1, 1], label="alora_row_slot")  # [B, 1, 1]
    width = emit.op(aten.sym_size.int, stacked, 2)
    batch = emit.op(aten.sym_size.int, stacked, 0)
    pick = emit.op(aten.expand.default, pick, [batch, 1, width])
    on = emit.op(aten.gather.default, stacked, 1, pick, label="alora_row_mask")  # [B, 1, T]
    mask = emit.op(aten.view.default, on, [batch, -1, 1], label="alora_mask")  # [B, T, 1] (L = T)
    return emit.op(aten.where.ScalarOther, mask, delta, 0.0, role=Role.UP, label="alora_delta")


def _refuse_alora_merge(adapter: LoraAdapter) -> None:
    if hasattr(adapter, "alora_tokens"):
        raise MergeError(f"aLoRA adapter {adapter.adapter_name!r} at {adapter.site_name!r} cannot be merged (nor can "
                         "PEFT's): it acts only on the tokens from each row's invocation on, so it is not a weight "
                         "delta. Keep it unmerged")
