"""BOFT: butterfly orthogonal fine-tuning, interchangeable with HF PEFT's ``BOFTConfig``. One file: config, sites,
nodes, fold, and PEFT's file format.

A site's weight, seen as ``W [out, n]`` (``n = in``; a Conv2d's ``[out, in·k·k]``), is rotated on its input side and
scaled per output::

    W' = s ⊙ (W Rᵀ)            R = M_{N-1} ··· M_1 M_0 [n, n],   M_i = P_i · blockdiag(Q_i1 … Q_iD) · P_iᵀ
    Q = (I - S)(I + S)⁻¹        S = (boft_R - boft_Rᵀ) / 2 per block   (the Cayley map: Q is orthogonal)

``boft_R [N, D, H, H]`` holds ``D`` blocks of size ``H`` (``D·H = n``) for each of the ``N`` butterfly factors,
``boft_s`` the scale per output, ``P_i`` PEFT's block-butterfly permutations (identities when ``N = 1``). PEFT's
linear layer computes ``s ⊙ (base(x R) - b) + b`` and its conv ``conv(x, W')``: both are the base call on ``W'``.

**In the graph** the call reads ``W'``: one matmul (or conv). ``R`` is never built: ``W Rᵀ`` is ``(R Wᵀ)ᵀ``, and
each factor acts on the rows of ``Wᵀ [n, out]`` as a gather (``P_iᵀ``), one ``bmm`` of the ``D`` blocks on
``[D, H, out]``, and a gather back (``P_i``): ``N·n·H·out`` multiplies where PEFT's dense products cost ``N·n³``.
The read is ``where(gate, W', W)``, so an adapter switched off (or merged) gives the base weight exactly. A second
adapter on the same call rotates the weight the first one gives (``W'' = s_b ⊙ (W' R_bᵀ)``), PEFT's composition
``x·R_b·R_a`` for active adapters ``[a, b]``. Where the call does not read its weight as a graph value (a
``call_module`` site of a symbolic_trace graph) the graph adds ``op(x, W' - W)`` to the output instead (LoHa's form,
``loha.apply_delta``); there, stacked adapters add their updates rather than compose.

**Training only**: ``boft_dropout`` is PEFT's multiplicative dropout (:class:`BoftDropout`, a ``call_module``):
for one butterfly factor drawn at random, ``int(p·D)`` random blocks of ``Q`` are replaced by the identity.

**Butterfly factors** (``boft_n_butterfly_factor = N > 1``): PEFT builds them only when its CUDA extension
(``fbd_cuda``) loads; without it (on a CPU) PEFT silently uses ``N = 1`` and its files then hold ``boft_R [1, D, H,
H]`` whatever the config says. fxpeft always builds the ``N`` factors the config asks for (PEFT's CUDA maths, in
plain torch), so such a CPU-made file is refused on load for its shapes, and a file fxpeft saves with ``N > 1``
loads only in a PEFT that has the extension.

Sites: ``nn.Linear`` and ``nn.Conv2d`` with a square kernel and ``groups = 1`` (PEFT 0.21.2's BOFT layers); Conv1d,
Conv3d, embeddings, grouped or non-square convolutions and weights stored ``[in, out]`` (HF ``Conv1D``) are refused.
PEFT's Conv2d forward applies ``stride[0]``/``padding[0]`` to both axes and drops the dilation; fxpeft keeps the
base call's own, so such sites warn (``differs_in_peft``) on save and load.

PEFT's file layout (keys ``base_model.model.<site>.boft_R`` ...; the permutations are not saved)::

    boft_R   [N, D, H, H]
    boft_s   [out, 1]        (a Conv2d: [1, out])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import ConfigError, MergeError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from fxpeft.sites import Site
from fxpeft.tags import Role, get_tag

from .loha import _eager, apply_delta, common_value
from .lora import Lora, _finite, adapter_dtype

__all__ = ["BOFTConfig", "BOFTAdapter", "BOFT", "BoftDropout", "butterfly_perm"]

aten = torch.ops.aten


@dataclass
class BOFTConfig(PeftConfigBase):
    """BOFT settings, with HF PEFT's field names and defaults.

    Args:
        boft_block_size: size ``H`` of each orthogonal block (0: derived from ``boft_block_num``).
        boft_block_num: number ``D`` of blocks per factor (0: derived from ``boft_block_size``); set exactly one of
            the two, and ``D·H`` is the site's input width (a Conv2d's ``in·k·k``).
        boft_n_butterfly_factor: number ``N`` of butterfly factors (1: OFT's block-diagonal rotation).
        boft_dropout: in training, the fraction of one factor's blocks replaced by the identity (PEFT's
            multiplicative dropout).
        fan_in_fan_out: accepted for PEFT compatibility; fxpeft reads the weight layout off the graph.
        bias: ``"none"``, ``"all"`` or ``"boft_only"`` (trained bias copies, as for every method).
        init_weights: True (``boft_R`` zero, ``boft_s`` one: the identity at start) or False (random).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as for every method.

    Example:
        >>> from fxpeft import BOFTConfig
        >>> BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"]).peft_type
        'BOFT'
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True


def butterfly_perm(n: int, blocks: int, half: int, levels: int) -> list[int]:
    """PEFT's block-butterfly permutation of ``n`` indices (``P[i, perm[i]] = 1``); the identity when ``levels`` is 0.

    The indices fall in ``blocks`` groups; each group is cut into chunks of ``half`` and its even-numbered chunks are
    moved before its odd-numbered ones.

    Example:
        >>> butterfly_perm(8, 2, 1, 1), butterfly_perm(8, 1, 2, 1)
        ([0, 2, 1, 3, 4, 6, 5, 7], [0, 1, 4, 5, 2, 3, 6, 7])
    """
    if levels == 0:
        return list(range(n))
    group = n // blocks
    chunks = group // half
    order = [*range(0, chunks, 2), *range(1, chunks, 2)]
    within = [c * half + j for c in order for j in range(half)]
    return [start + w for start in range(0, n, group) for w in within]


def _width(site: Site) -> int:
    """``n``: the rotated width (a linear's inputs; a Conv2d's flattened filter ``in·k·k``)."""
    return site.in_features * math.prod(site.kernel_size) if site.kind == "conv" else site.in_features


def _blocks(n: int, config: BOFTConfig) -> tuple[int, int, int] | str:
    """``(N, D, H)`` for a width ``n`` (PEFT's ``update_layer`` rules), or why the config cannot rotate it."""
    size, num, levels = config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor - 1
    if size == 0:  # boft_block_num given
        if n % num:
            return f"its width {n} is not divisible by boft_block_num={num}"
        if levels and (levels > int(math.log2(num)) or num % 2 ** levels):
            return (f"boft_block_num={num} is not a multiple of 2**(boft_n_butterfly_factor - 1) = {2 ** levels}; "
                    "lower boft_n_butterfly_factor")
        size = n // num
    else:
        if n % size:
            return f"its width {n} is not divisible by boft_block_size={size}"
        if levels and n % (size * 2 ** levels):
            return (f"its width {n} is not a multiple of boft_block_size · 2**(boft_n_butterfly_factor - 1) = "
                    f"{size * 2 ** levels}; lower boft_n_butterfly_factor or boft_block_size")
        num = n // size
    if levels and (num % 2 or size % 2):
        return f"butterfly factors need an even block count and size, got {num} blocks of {size}"
    return levels + 1, num, size


def _perms(n: int, layout: tuple[int, int, int]) -> list[list[int]]:
    """Each factor's permutation (PEFT's ``boft_P[i]``, as indices)."""
    factors, num, size = layout
    return [butterfly_perm(n, num // 2 ** i, size // 2, factors - 1) for i in range(factors)]


class BoftDropout(nn.Module):
    """PEFT's multiplicative dropout on the rotation blocks ``Q [N, D, H, H]``: in training, for one factor drawn at
    random, ``int(p·D)`` random blocks become the identity; in eval, the blocks pass through."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        factors, num, size, _ = q.shape
        dropped = int(self.p * num)
        if not self.training or dropped == 0:
            return q
        mask = torch.zeros(factors, num, 1, 1, dtype=torch.bool, device=q.device)
        mask[torch.randint(0, factors, ()), torch.randperm(num, device=q.device)[:dropped]] = True
        return torch.where(mask, torch.eye(size, dtype=q.dtype, device=q.device), q)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BOFTAdapter(AdapterModule):
    """One BOFT adapter at one site: PEFT's ``boft_R`` and ``boft_s``, the identity block and the butterfly
    permutations as buffers (``perm_i``/``inv_i``, only where not the identity), and the training-only dropout."""

    method = "boft"

    def __init__(self, site: Site, adapter_name: str, config: BOFTConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site.name, adapter_name)
        self.kind, self.weight_shape, self.width = site.kind, tuple(site.weight_shape), _width(site)
        layout = _blocks(self.width, config)
        if isinstance(layout, str):  # check_site refuses such sites before any change; a direct call gets the same
            raise ConfigError(f"{site.name}: {layout}")
        self.layout = factors, num, size = layout
        # the config's fields, written back on save
        self.flags = {"boft_block_size": int(config.boft_block_size), "boft_block_num": int(config.boft_block_num),
                      "boft_n_butterfly_factor": int(config.boft_n_butterfly_factor),
                      "boft_dropout": float(config.boft_dropout)}
        self.boft_R = nn.Parameter(torch.zeros(factors, num, size, size, dtype=dtype, device=device))
        s_shape = (1, site.out_features) if site.kind == "conv" else (site.out_features, 1)
        self.boft_s = nn.Parameter(torch.ones(s_shape, dtype=dtype, device=device))
        self.register_buffer("eye", torch.eye(size, dtype=dtype, device=device), persistent=False)
        self.permuted: list[int] = []  # the factors whose permutation is not the identity
        for i, perm in enumerate(_perms(self.width, self.layout)):
            if perm != sorted(perm):
                idx = torch.tensor(perm, dtype=torch.long, device=device)
                self.register_buffer(f"perm_{i}", idx, persistent=False)
                self.register_buffer(f"inv_{i}", torch.argsort(idx), persistent=False)
                self.permuted.append(i)
        if config.boft_dropout > 0:
            self.boft_dropout = BoftDropout(config.boft_dropout)

    def reset_parameters(self, init: bool) -> None:
        """PEFT's init: the identity (``boft_R`` 0, ``boft_s`` 1), or with ``init=False`` N(0, 0.1) and N(1, 0.1)."""
        with torch.no_grad():
            if init:
                self.boft_R.zero_()
                self.boft_s.fill_(1.0)
            else:
                nn.init.normal_(self.boft_R, 0.0, 0.1)
                nn.init.normal_(self.boft_s, 1.0, 0.1)

    def blocks(self) -> torch.Tensor:
        """The fp32 rotation blocks ``Q [N, D, H, H]`` (no dropout)."""
        return cayley(_eager, self.boft_R.detach().float(), self.eye.float())

    def perms(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``factor -> (perm, inverse)`` for the factors that permute."""
        return {i: (getattr(self, f"perm_{i}"), getattr(self, f"inv_{i}")) for i in self.permuted}


def cayley(op, r, eye):
    """PEFT's ``cayley_batch`` on ``r [N, D, H, H]``: ``(I - S)(I + S)⁻¹`` per block, ``S`` its skew part.

    ``op(aten_op, *args, label=..., **kwargs)`` applies an aten op: as a graph node (``insert``) or on tensors
    (``fold``), so the graph and the fold compute one formula.
    """
    rt = op(aten.transpose.int, r, -1, -2, label="Rt")
    skew = op(aten.mul.Tensor, op(aten.sub.Tensor, r, rt, label="R_minus_Rt"), 0.5, label="skew")  # S = (R - Rᵀ) / 2
    plus = op(aten.add.Tensor, eye, skew, label="I_plus_S")
    minus = op(aten.sub.Tensor, eye, skew, label="I_minus_S")
    return op(aten.linalg_solve.default, plus, minus, left=False, label="rotation_blocks")  # Q [N, D, H, H]


def rotate_rows(op, rows, q, perms: dict, layout: tuple[int, int, int]):
    """``R @ rows`` for ``rows [n, cols]``: each factor ``M_i = P_i · blockdiag(Q_i) · P_iᵀ``, ``M_0`` first.

    ``perms[i] = (perm, inv)`` as graph values or tensors (absent: the identity). ``(P_iᵀ X)`` is ``X[inv]`` and
    ``(P_i X)`` is ``X[perm]``.
    """
    factors, num, size = layout
    for i in range(factors):
        if i in perms:
            rows = op(aten.index_select.default, rows, 0, perms[i][1], label=f"unpermute_{i}")  # P_iᵀ X
        blocks = op(aten.select.int, q, 0, i, label=f"blocks_{i}")  # [D, H, H]
        x = op(aten.reshape.default, rows, [num, size, -1], label=f"rows_{i}")  # [n, cols] -> [D, H, cols]
        x = op(aten.bmm.default, blocks, x, label=f"rotated_{i}")  # each block on its H rows
        rows = op(aten.reshape.default, x, [num * size, -1], label=f"rows_rotated_{i}")  # -> [n, cols]
        if i in perms:
            rows = op(aten.index_select.default, rows, 0, perms[i][0], label=f"permute_{i}")  # P_i X
    return rows


def rotated_weight(op, weight, q, s, perms: dict, adapter: BOFTAdapter):
    """``W' = s ⊙ (W Rᵀ)`` in the weight's shape, from ``W`` (the weight's layout and dtype of ``q``)."""
    out = adapter.weight_shape[0]
    flat = op(aten.reshape.default, weight, [out, adapter.width], label="weight_flat") if adapter.kind == "conv" \
        else weight  # [out, in, k, k] -> [out, n]
    rows = op(aten.t.default, flat, label="weight_rows")  # Wᵀ [n, out]
    rows = rotate_rows(op, rows, q, perms, adapter.layout)  # R Wᵀ [n, out]
    # W Rᵀ [out, n], in the weight's own (row-major) layout: the call then runs the same kernel on W' as on W, so an
    # identity rotation gives exactly the base outputs
    w = op(aten.clone.default, op(aten.t.default, rows, label="rows_t"), memory_format=torch.contiguous_format,
           label="rotated_weight")
    if adapter.kind == "conv":
        s = op(aten.reshape.default, s, [out, 1], label="scale_col")  # boft_s [1, out] -> [out, 1]
    w = op(aten.mul.Tensor, w, s, label="scaled_rotated_weight")  # s ⊙ (W Rᵀ)
    if adapter.kind == "conv":
        w = op(aten.reshape.default, w, list(adapter.weight_shape), label="scaled_rotated_weight")  # -> [out, in, k, k]
    return w


def _current_weight(node: fx.Node) -> fx.Node:
    """The value a call reads as its weight: the weight's read, or the last adapter node standing in for it."""
    while True:
        above = [u for u in node.users
                 if (tag := get_tag(u)) is not None and tag.replaces is not None and u.args[tag.replaces] is node]
        if not above:
            return node
        node = above[0]


def _check_site(site: Site, config: BOFTConfig) -> str | None:
    """Why PEFT's BOFT cannot adapt ``site`` (it has nn.Linear and nn.Conv2d layers), or the config not fit it."""
    if site.kind == "embedding":
        return ("PEFT's BOFT does not adapt embeddings (PEFT 0.21.2 has BOFT layers for nn.Linear and nn.Conv2d only); "
                "leave the embedding out of target_modules")
    if site.kind == "linear" and site.fan_in_fan_out:
        return (f"a weight stored [in, out] ({site.module_type}): PEFT's BOFT adapts nn.Linear, not HF's Conv1D or a "
                "bare x @ W")
    if site.kind == "conv":
        if len(site.kernel_size) != 2:
            return f"a {len(site.kernel_size)}-d convolution: PEFT's BOFT adapts nn.Conv2d only"
        if site.kernel_size[0] != site.kernel_size[1]:
            return f"a non-square kernel {tuple(site.kernel_size)}: PEFT's BOFT Conv2d needs a square kernel"
        if site.groups != 1:
            return f"a grouped convolution (groups={site.groups}): PEFT's BOFT refuses groups > 1"
    layout = _blocks(_width(site), config)
    return f"BOFT cannot split this site: {layout}" if isinstance(layout, str) else None


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@PeftRegistry.register("boft")
class BOFT(Method):
    config_cls = BOFTConfig
    display_name = "BOFT"
    color = ("#ffe3e3", "#c92a2a")
    site_kinds = frozenset({"linear", "conv"})
    spec_aliases = {"block_size": "boft_block_size", "block_num": "boft_block_num",
                    "butterfly": "boft_n_butterfly_factor", "dropout": "boft_dropout", "init": "init_weights"}
    default_targets = Lora.default_targets  # PEFT's BOFT table is a copy of LoRA's
    peft_default_table = "TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING"

    @classmethod
    def validate_config(cls, config: BOFTConfig) -> None:
        size, num, factor = config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor
        for name, v in (("boft_block_size", size), ("boft_block_num", num)):
            if not (_int(v) and v >= 0):
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        if (size == 0) == (num == 0):
            raise ConfigError(f"set exactly one of boft_block_size ({size}) and boft_block_num ({num}) to a positive "
                              "integer (their product is each site's width), and the other to 0")
        if not (_int(factor) and factor >= 1):
            raise ConfigError(f"boft_n_butterfly_factor must be an integer >= 1, got {factor!r}")
        if not (_finite(config.boft_dropout) and 0.0 <= config.boft_dropout <= 1.0):
            raise ConfigError(f"boft_dropout must be a probability in [0, 1], got {config.boft_dropout!r}")
        if not isinstance(config.init_weights, bool):
            raise ConfigError(f"init_weights must be True or False, got {config.init_weights!r}")
        if config.bias not in ("none", "all", "boft_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'boft_only', got {config.bias!r}")

    @classmethod
    def check_site(cls, site: Site, config: BOFTConfig) -> str | None:
        return _check_site(site, config) or super().check_site(site, config)

    @classmethod
    def build(cls, site: Site, config: BOFTConfig, adapter_name: str, weight: torch.Tensor) -> BOFTAdapter:
        adapter = BOFTAdapter(site, adapter_name, config, adapter_dtype(weight, config.keep_base_dtype), weight.device)
        adapter.reset_parameters(config.init_weights)
        return adapter

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: BOFTAdapter) -> None:
        dtype, base_dtype = adapter.boft_R.dtype, emit.gm.get_parameter(site.weight).dtype

        def op(aten_op, *args, role: Role = Role.COMPUTE, label: str | None = None, **kwargs) -> fx.Node:
            return emit.op(aten_op, *args, role=role, label=label, **kwargs)

        q = cayley(op, emit.param("boft_R", label="boft_R"), emit.param("eye", label="eye"))
        if hasattr(adapter, "boft_dropout"):  # training: some blocks of one factor become the identity
            q = emit.module("boft_dropout", q, role=Role.DROPOUT, label="boft_dropout")
        perms = {i: (emit.param(f"perm_{i}", label=f"perm_{i}"), emit.param(f"inv_{i}", label=f"inv_{i}"))
                 for i in adapter.permuted}
        s = emit.param("boft_s", Role.SCALING, label="boft_s")
        call = emit.call
        # Rotations compose (PEFT: x·R_b·R_a for adapters [a, b]): this one rotates the weight the call reads now,
        # after the adapters already there. The base weight itself gets its own read, so that the merge passes see
        # one reader per call.
        top = _current_weight(call.weight_node) if call.weight_node is not None else None
        weight = emit.weight(own=True) if top is None or top is call.weight_node else top
        w = weight if dtype == base_dtype else emit.cast(weight, dtype)
        new = rotated_weight(op, w, q, s, perms, adapter)  # W' in the adapter's dtype
        gate = emit.param("gate", Role.GATE, label="gate")
        if top is not None:  # the call reads W' (the weight below while off or merged)
            if dtype != base_dtype:
                new = emit.cast(new, base_dtype)
            out = emit.op(aten.where.self, gate, new, top, role=Role.OUT, replaces=2, label="adapted_weight")
            emit.replace_input(top, out)
            return
        # A call_module call: y + op(x, W' - W), with W' - W zero while off or merged.
        delta = op(aten.where.ScalarOther, gate, op(aten.sub.Tensor, new, w, label="delta_weight"), 0.0,
                   label="delta_weight")
        apply_delta(emit, site, delta, dtype, base_dtype)

    @classmethod
    def fold(cls, adapter: BOFTAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        s = adapter.boft_s.detach().float()
        return rotated_weight(_eager, weight.float(), adapter.blocks(), s, adapter.perms(), adapter), bias

    @classmethod
    def unfold(cls, adapter: BOFTAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        """The inverse of :meth:`fold`: ``Wᵀ = R⁻¹ (W' / s)ᵀ``, each block inverted in fp64 (not transposed), so the
        fold's fp32 rotation, orthogonal only to rounding, is undone exactly up to fp32 rounding."""
        s = adapter.boft_s.detach().double().reshape(-1, 1)  # [out, 1]
        if not bool((s != 0).all()):
            raise MergeError(f"BOFT scale boft_s at {adapter.site_name!r} has zeros: its merge cannot be undone")
        out, (factors, num, size) = adapter.weight_shape[0], adapter.layout
        inv = torch.linalg.inv(adapter.blocks().double())  # Q⁻¹ per block [N, D, H, H]
        rows = (weight.double().reshape(out, adapter.width) / s).t()  # (W'/s)ᵀ = R Wᵀ  [n, out]
        perms = adapter.perms()
        for i in reversed(range(factors)):  # M_i⁻¹ = P_i · blockdiag(Q_i⁻¹) · P_iᵀ, last factor first
            if i in perms:
                rows = rows[perms[i][1]]
            rows = torch.bmm(inv[i], rows.reshape(num, size, out)).reshape(num * size, out)
            if i in perms:
                rows = rows[perms[i][0]]
        return rows.t().reshape(adapter.weight_shape).to(weight.dtype), bias

    @classmethod
    def differs_in_peft(cls, site: Site) -> str | None:
        if site.kind != "conv":
            return None
        def uniform(v: Any) -> bool:  # one value for both axes (PEFT passes v[0])
            return isinstance(v, (tuple, list)) and len(set(v)) == 1

        if tuple(site.dilation or (1, 1)) != (1, 1) or not uniform(site.stride) or not uniform(site.padding):
            return ("Conv2d site(s) with a dilation, or a stride or padding that differs per axis (or is a string): "
                    "PEFT's BOFT Conv2d forward drops the dilation and applies stride[0]/padding[0] to both axes")
        return None

    # ---------------------------------------------------------------------------------- PEFT file format
    @classmethod
    def site_shapes(cls, config: BOFTConfig, site: Site) -> dict[str, tuple[int, ...]]:
        factors, num, size = _blocks(_width(site), config)
        return {"boft_R": (factors, num, size, size),
                "boft_s": (1, site.out_features) if site.kind == "conv" else (site.out_features, 1)}

    @classmethod
    def site_tensors(cls, adapter: BOFTAdapter, site: Site) -> dict[str, torch.Tensor]:
        return {"boft_R": adapter.boft_R.detach(), "boft_s": adapter.boft_s.detach()}

    @classmethod
    def load_site_tensors(cls, adapter: BOFTAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            adapter.boft_R.copy_(tensors["boft_R"])
            adapter.boft_s.copy_(tensors["boft_s"])

    @classmethod
    def site_settings(cls, config: BOFTConfig, site: Site) -> dict[str, Any]:
        return {"layout": _blocks(_width(site), config)}

    @classmethod
    def adapter_settings(cls, adapter: BOFTAdapter) -> dict[str, Any]:
        return {"layout": adapter.layout}

    @classmethod
    def config_fields(cls, adapters: dict[str, BOFTAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        flags = {k: common_value(adapters, k, lambda m, k=k: m.flags[k]) for k in next(iter(adapters.values())).flags}
        return {**flags, "init_weights": True, "layers_to_transform": None, "layers_pattern": None}
