"""OFT: orthogonal fine-tuning, interchangeable with HF PEFT's ``OFTConfig`` (PEFT >= 0.18's parameterisation). One
file: config, sites, nodes, fold, and PEFT's file format.

Each site's rotated dimension (a linear's ``in``, an embedding's ``dim``, a conv's ``in·kh·kw``) is cut into ``n``
blocks of ``b`` features (``n = r``, or ``dim / oft_block_size``; PEFT moves a size that does not divide to the nearest
one that does, with a warning). Each block has a trained vector ``q`` of its ``b(b-1)/2`` strictly-upper-triangular
entries (PEFT's ``oft_R.weight [n, b(b-1)/2]``; one shared row with ``block_share``), and::

    Q = U - Uᵀ                        U: q laid into the strict upper triangle   (skew-symmetric, [n, b, b])
    R = I + 2Q + 2Q² + ... + Q^(t-1)  Cayley–Neumann, t = num_cayley_neumann_terms (PEFT's series: t=3 and t=4 agree)
    R = (I - Q)(I + Q)⁻¹              exact Cayley (use_cayley_neumann=False: a batched solve)

(PEFT's two forms approximate transposed rotations, ``(I+Q)(I-Q)⁻¹`` and ``(I-Q)(I+Q)⁻¹``; fxpeft computes each as
PEFT does, so files give PEFT's outputs either way.) PEFT rotates the activations block by block: a linear reads
``x·B`` (``B = blockdiag(R₁..Rₙ)``), an embedding's output is ``E[i]·B``. That is the call reading a rotated weight::

    linear / conv:  W' = W · Bᵀ   (W seen as [out, in·kh·kw])        embedding:  E' = E · B

**In the graph** a linear's input (an embedding's output) is rotated per block, ``[..., n, 1, b] @ [n, b, b]``, as
PEFT does: in training that is far cheaper than reading a rotated weight, whose backward needs the full ``[out, in]``
gradient of ``W'`` to reach ``R``. A conv reads ``W'`` (one conv as in the base model; the merge is exactly that fold),
built per block, ``[n, rows, b] @ [n, b, b]``; where a conv call has no weight value to replace (a ``call_module``
site of a symbolic_trace graph) or the adapter is fp32 on a bf16/fp16 base, it adds ``conv(x, W' - W)``.

``coft`` (constrained OFT) projects each block's ``Q`` into a Frobenius ball of radius ``eps / √n`` on every call,
writing the projection back into the parameter, as PEFT does. ``module_dropout`` (training only) swaps a random
``int(p·n)`` blocks for the identity per call (PEFT 0.21.2 builds this layer but never calls it; fxpeft applies it as
documented). Switching the adapter off zeroes ``q``: ``R = I`` and ``W' = W`` exactly.

Sites: ``nn.Linear``, ``nn.Embedding`` and square-kernel ``nn.Conv2d`` (groups 1, dilation 1), as PEFT 0.21.2.
HF ``Conv1D`` (weights stored ``[in, out]``), Conv1d/Conv3d, grouped or dilated convs are refused.

**Conv2d differs from PEFT.** PEFT 0.21's conv OFT rotates unfolded ``kh×kw`` patches of the input and folds them back
with ``F.fold``, which sums overlapping patches: at init it is not the identity (and it ignores the conv's padding
and stride). fxpeft rotates the conv's weight over ``in·kh·kw`` instead, which is PEFT's own merge (``W·Bᵀ``): the
identity at init and exactly foldable. Files keep PEFT's key layout, so PEFT loads them, but computes differently;
saving and loading such a file warns (``differs_in_peft``).

PEFT's file layout: ``base_model.model.<site>.oft_R.weight [n, b(b-1)/2]`` (``[1, ...]`` with ``block_share``); on an
embedding, ``oft_embedding_R.weight``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxpeft.errors import AdapterFileError, ConfigError
from fxpeft.registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry, config_from_fields
from fxpeft.sites import Site
from fxpeft.tags import Role, get_tag

from .loha import apply_delta, common_value, full_precision
from .lora import Lora, _finite, adapter_dtype

__all__ = ["OFTConfig", "OFTAdapter", "OFT", "BlockDropout", "CoftProjection", "oft_blocks"]

aten = torch.ops.aten


@dataclass
class OFTConfig(PeftConfigBase):
    """OFT settings, with HF PEFT's field names and defaults.

    Args:
        r: number of blocks per site (0: derived from ``oft_block_size``). Set exactly one of ``r`` and
            ``oft_block_size``.
        oft_block_size: features per block (0: derived from ``r``); PEFT's default is 32.
        module_dropout: in training, the fraction of blocks replaced by the identity on each call.
        init_weights: True (zero: the adapter starts as the identity) or False (normal, std 0.1).
        coft: constrained OFT: each block's skew matrix is projected into a ball of radius ``eps / √n``.
        eps: that radius (before the ``1/√n``), only used with ``coft``.
        block_share: one rotation shared by every block of a site.
        use_cayley_neumann: the truncated Neumann series (True, PEFT's default) or the exact Cayley transform.
        num_cayley_neumann_terms: terms of that series.
        bias: PEFT's bias training; only ``"none"`` is supported (train biases with ``modules_to_save``).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as for every method.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(8, 4)))
        >>> gm = fxpeft.rewrite(gm, fxpeft.OFTConfig(oft_block_size=4, target_modules=["0"]))
        >>> x = torch.randn(2, 8); bool((gm(x) == gm.get_submodule("0")(x)).all())  # zero init: the identity
        True
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    bias: str = "none"


def _nearest_divisor(dim: int, want: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``dim`` nearest ``want`` (the lower one on a tie), ``dim`` if
    ``want`` is at least ``dim``."""
    if want >= dim:
        return dim
    lower = next(d for d in range(want, 0, -1) if dim % d == 0)
    higher = next(d for d in range(want, dim + 1) if dim % d == 0)
    return lower if want - lower <= higher - want else higher


def _rotated_dim(site: Site) -> int:
    """The features OFT rotates: a linear's ``in``, an embedding's ``dim``, a conv's ``in·kh·kw``."""
    return math.prod(site.weight_shape[1:])


def oft_blocks(config: OFTConfig, dim: int) -> tuple[int, int, bool]:
    """``(n, b, adjusted)``: the number of blocks and the block size PEFT uses on a ``dim``-wide site, and whether
    the asked-for size did not divide ``dim`` (PEFT then takes the nearest divisor, and warns).

    Example:
        >>> oft_blocks(OFTConfig(), 64), oft_blocks(OFTConfig(oft_block_size=14), 64)
        ((2, 32, False), (4, 16, True))
    """
    asked = config.oft_block_size if config.r == 0 else config.r
    got = asked if dim % asked == 0 and asked <= dim else _nearest_divisor(dim, asked)
    n, b = (dim // got, got) if config.r == 0 else (got, dim // got)
    return n, b, got != asked


class BlockDropout(nn.Module):
    """OFT's multiplicative dropout: in training, ``int(p·n)`` random blocks of ``R [n, b, b]`` become the identity
    for the call; in eval (or with one shared block) ``R`` passes through."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, rotation: torch.Tensor) -> torch.Tensor:
        n, b, _ = rotation.shape
        if not self.training or n == 1:
            return rotation
        mask = torch.zeros(n, device=rotation.device, dtype=rotation.dtype)
        mask[torch.randperm(n, device=rotation.device)[:int(self.p * n)]] = 1
        mask = mask.view(n, 1, 1)
        eye = torch.eye(b, device=rotation.device, dtype=rotation.dtype)
        return (1 - mask) * rotation + mask * eye

    def extra_repr(self) -> str:
        return f"p={self.p}"


class CoftProjection(nn.Module):
    """Constrained OFT: project each block's skew matrix ``Q`` into the Frobenius ball of radius ``eps / √n`` and
    write the projection back into the parameter it is given (PEFT does so on every call, without gradient), so
    training continues from the projected point. Returns the (updated) parameter."""

    def __init__(self, eps: float, block: int) -> None:
        super().__init__()
        self.eps, self.block = float(eps), int(block)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q.copy_(coft_project(q, self.eps, self.block))
        return q

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def coft_project(q: torch.Tensor, eps: float, block: int) -> torch.Tensor:
    """``q [n, b(b-1)/2]`` with each block's skew matrix scaled into the ball ``||Q||_F <= eps / √n``."""
    n = q.shape[0]
    radius = eps / torch.sqrt(torch.tensor(float(n)))
    index = _upper_index(block, q.device)
    skew = _skew(_eager, q, index, n, block)  # [n, b, b]
    norm = torch.linalg.matrix_norm(skew, keepdim=True)  # [n, 1, 1]
    inside = norm <= radius
    projected = torch.where(inside, skew, radius * (skew / norm))
    return projected.flatten(1)[:, index]  # the strict upper triangle again: [n, b(b-1)/2]


def _upper_index(block: int, device: torch.device | None = None) -> torch.Tensor:
    """Flat positions (``row·b + col``) of the strict upper triangle of a ``b×b`` matrix, in PEFT's order."""
    rows, cols = torch.triu_indices(block, block, 1, device=device)
    return rows * block + cols


def _eager(aten_op, *args, role: Role | None = None, label: str | None = None, replaces: int | None = None,
           **kwargs):
    """The eager twin of ``emit.op``: the formulas below run as graph nodes or on tensors (fold) alike."""
    return aten_op(*args, **kwargs)


def _skew(op, q, index, n: int, b: int):
    """``Q = U - Uᵀ`` with ``q [n, b(b-1)/2]`` laid into ``U``'s strict upper triangle: ``[n, b, b]``."""
    flat = op(aten.new_zeros.default, q, [n, b * b], label="zeros")
    flat = op(aten.index_copy.default, flat, 1, index, q, label="upper_flat")  # q at (row·b + col), row < col
    upper = op(aten.view.default, flat, [n, b, b], label="upper")  # [n, b*b] -> [n, b, b]
    return op(aten.sub.Tensor, upper, op(aten.transpose.int, upper, 1, 2, label="lower"), label="skew")


def _cayley(op, skew, eye, n: int, neumann: bool, terms: int):
    """PEFT's rotation from ``Q [n, b, b]``: ``I + 2Q + 2Q² + ... + Q^(t-1)``, or ``solve(R (I+Q) = I-Q)``."""
    if not neumann:
        plus = op(aten.add.Tensor, eye, skew, label="i_plus_skew")
        minus = op(aten.sub.Tensor, eye, skew, label="i_minus_skew")
        return op(aten.linalg_solve.default, plus, minus, left=False, label="rotation")  # (I-Q)(I+Q)^-1
    if terms <= 1:
        return op(aten.expand.default, eye, [n, -1, -1], label="rotation")  # R = I
    rot = op(aten.add.Tensor, eye, skew, alpha=2.0, label="rotation")  # I + 2Q
    if terms <= 2:
        return rot
    power = op(aten.bmm.default, skew, skew, label="skew_pow")
    rot = op(aten.add.Tensor, rot, power, alpha=2.0, label="rotation")  # + 2Q²
    for _ in range(3, terms - 1):
        power = op(aten.bmm.default, power, skew, label="skew_pow")
        rot = op(aten.add.Tensor, rot, power, alpha=2.0, label="rotation")  # + 2Q^k
    power = op(aten.bmm.default, power, skew, label="skew_pow")
    return op(aten.add.Tensor, rot, power, label="rotation")  # + Q^(t-1)


def _rotate_weight(op, weight, matrix, blocks: int, block: int, shape: list[int], replaces: int | None):
    """``W' = W · blockdiag(M)``: ``W`` seen as ``[rows, n, b]``, each block column times its ``M [b, b]``
    (``M``: ``Rᵀ`` for a linear/conv, ``R`` for an embedding; ``[1, b, b]`` is shared by every block)."""
    w = weight
    if len(shape) > 2:  # a conv: [out, in, kh, kw] -> [out, in·kh·kw]
        w = op(aten.flatten.using_ints, w, 1, label="weight_2d", replaces=replaces)
    w = op(aten.unflatten.int, w, 1, [blocks, block], label="weight_blocks", replaces=replaces)  # [rows, n, b]
    w = op(aten.transpose.int, w, 0, 1, label="weight_blocks", replaces=replaces)  # [n, rows, b]
    w = op(aten.matmul.default, w, matrix, label="rotated_blocks", replaces=replaces)  # [n, rows, b]
    w = op(aten.transpose.int, w, 0, 1, label="rotated_blocks", replaces=replaces)  # [rows, n, b]
    return op(aten.reshape.default, w, shape, label="rotated_weight", replaces=replaces,
              role=Role.OUT if replaces is not None else Role.COMPUTE)  # the weight's shape


def _base_and_reader(node: fx.Node, site: Site) -> tuple[fx.Node, fx.Node | None]:
    """The value beneath this site's adapter chain at ``node`` (follow ``args[tag.replaces]`` through the site's own
    adapter nodes), and the adapter node that reads it (None when ``node`` is already the base value)."""
    reader = None
    while isinstance(node, fx.Node) and (tag := get_tag(node)) is not None and tag.site == site.name \
            and tag.replaces is not None:
        reader, node = node, node.args[tag.replaces]
    return node, reader


def _wire(emit: Emit, old: fx.Node, new: fx.Node, reader: fx.Node | None) -> None:
    """Make ``reader`` (another adapter's node reading ``old``), or else the call, read ``new`` instead."""
    call = emit.call
    emit.call = dataclasses.replace(call, weight_user=reader)  # replace_input rewires weight_user and the call
    try:
        emit.replace_input(old, new)
    finally:
        emit.call = call


class OFTAdapter(AdapterModule):
    """One OFT adapter at one site: PEFT's ``oft_R.weight`` as ``oft_R`` (``[n, b(b-1)/2]``, ``[1, ...]`` with
    ``block_share``), the index and identity buffers the graph reads, and ``coft`` / ``module_dropout`` when asked."""

    method = "oft"

    def __init__(self, site: Site, adapter_name: str, config: OFTConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site.name, adapter_name)
        self.kind, self.weight_shape = site.kind, tuple(site.weight_shape)
        self.blocks, self.block, _ = oft_blocks(config, _rotated_dim(site))
        self.settings = _settings(config, site)
        # the config's fields, written back on save
        self.fields = {"r": int(config.r), "oft_block_size": int(config.oft_block_size),
                       "module_dropout": float(config.module_dropout), "coft": bool(config.coft),
                       "eps": float(config.eps), "block_share": bool(config.block_share),
                       "use_cayley_neumann": bool(config.use_cayley_neumann),
                       "num_cayley_neumann_terms": int(config.num_cayley_neumann_terms)}
        rows = 1 if config.block_share else self.blocks
        self.oft_R = nn.Parameter(torch.empty(rows, self.block * (self.block - 1) // 2, dtype=dtype, device=device))
        self.register_buffer("upper_index", _upper_index(self.block, device), persistent=False)
        self.register_buffer("eye", torch.eye(self.block, dtype=dtype, device=device), persistent=False)
        if config.coft:
            self.coft = CoftProjection(config.eps, self.block)
        if config.module_dropout > 0:
            self.module_dropout = BlockDropout(config.module_dropout)

    def reset_parameters(self, init: bool) -> None:
        """PEFT's init: zeros (``R = I``: the identity at start), or normal with std 0.1 (``init_weights=False``)."""
        with torch.no_grad():
            nn.init.zeros_(self.oft_R) if init else nn.init.normal_(self.oft_R, mean=0.0, std=0.1)

    def block_matrix(self) -> torch.Tensor:
        """The fp32 per-block matrix the weight is multiplied by (``Rᵀ``, or ``R`` on an embedding), ``[n|1, b, b]``,
        whether the adapter is on or not (``coft`` projects the parameter first, as PEFT's merge does)."""
        q = self.coft(self.oft_R) if hasattr(self, "coft") else self.oft_R
        q = q.detach().float()
        skew = _skew(_eager, q, self.upper_index, q.shape[0], self.block)
        rot = _cayley(_eager, skew, self.eye.float(), q.shape[0], self.fields["use_cayley_neumann"],
                      self.fields["num_cayley_neumann_terms"])
        return rot if self.kind == "embedding" else rot.transpose(1, 2)


def _settings(config: OFTConfig, site: Site) -> dict[str, Any]:
    n, b, _ = oft_blocks(config, _rotated_dim(site))
    return {"blocks": n, "block": b, "block_share": bool(config.block_share), "coft": bool(config.coft),
            "eps": float(config.eps), "neumann": bool(config.use_cayley_neumann),
            "terms": int(config.num_cayley_neumann_terms), "module_dropout": float(config.module_dropout)}


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _version(text: Any) -> tuple[int, ...]:
    """``"0.18.0.dev0@abc"`` -> ``(0, 18, 0)``; anything unreadable -> ``(0,)``."""
    parts = []
    for p in str(text).partition("@")[0].split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit()) if p[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or (0,)


@PeftRegistry.register("oft")
class OFT(Method):
    config_cls = OFTConfig
    display_name = "OFT"
    color = ("#e5dbff", "#5f3dc4")
    site_kinds = frozenset({"linear", "conv", "embedding"})
    spec_aliases = {"block_size": "oft_block_size", "dropout": "module_dropout", "init": "init_weights",
                    "neumann": "use_cayley_neumann"}
    default_targets = Lora.default_targets  # PEFT's OFT table is a copy of LoRA's
    peft_default_table = "TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING"

    # ---------------------------------------------------------------------------------- config and sites
    @classmethod
    def validate_config(cls, config: OFTConfig) -> None:
        if not _nonneg_int(config.r) or not _nonneg_int(config.oft_block_size):
            raise ConfigError(f"r and oft_block_size must be integers >= 0, got r={config.r!r}, "
                              f"oft_block_size={config.oft_block_size!r}")
        if (config.r == 0) == (config.oft_block_size == 0):  # PEFT's rule: exactly one of them
            raise ConfigError(f"set exactly one of r ({config.r}) and oft_block_size ({config.oft_block_size}) to a "
                              "positive value and the other to 0: r x oft_block_size == the layer's in_features")
        if not (_finite(config.module_dropout) and 0.0 <= config.module_dropout <= 1.0):
            raise ConfigError(f"module_dropout must be a probability in [0, 1], got {config.module_dropout!r}")
        if not (_finite(config.eps) and config.eps >= 0):
            raise ConfigError(f"eps must be a finite number >= 0, got {config.eps!r}")
        for name in ("init_weights", "coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(config, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(config, name)!r}")
        terms = config.num_cayley_neumann_terms
        if not (_nonneg_int(terms) and terms >= 1):
            raise ConfigError(f"num_cayley_neumann_terms must be a positive integer, got {terms!r}")
        if config.bias != "none":
            raise ConfigError(f"bias={config.bias!r} is not supported with OFT; use bias='none' and list the modules "
                              "whose bias should train in modules_to_save")

    @classmethod
    def check_site(cls, site: Site, config: OFTConfig) -> str | None:
        if site.kind == "linear" and site.fan_in_fan_out:
            return (f"a weight stored [in, out] ({site.module_type}): PEFT's OFT adapts nn.Linear, nn.Conv2d and "
                    "nn.Embedding, not HF's Conv1D or a bare x @ W")
        if site.kind == "conv":
            k = tuple(site.kernel_size)
            if len(k) != 2:
                return f"{len(k)}-d convolution: PEFT's OFT adapts Conv2d only"
            if site.groups != 1:
                return f"grouped convolution (groups={site.groups}) is not supported by OFT (PEFT's neither)"
            if any(d != 1 for d in site.dilation or ()):
                return f"dilated convolution (dilation={tuple(site.dilation)}): PEFT's OFT refuses dilation > 1"
            if k[0] != k[1]:
                return f"non-square kernel {k}: PEFT's OFT sizes its blocks for kh == kw"
        return super().check_site(site, config)

    @classmethod
    def check_selection(cls, config: OFTConfig, sites: list[Site]) -> None:
        moved = [s.name for s in sites if oft_blocks(config, _rotated_dim(s))[2]]
        if moved:
            what = "oft_block_size" if config.r == 0 else "r"
            warnings.warn(f"{what}={getattr(config, what)} does not divide the rotated dimension of {moved[:3]}"
                          f"{' ...' if len(moved) > 3 else ''}; as PEFT, the nearest divisor is used there")

    @classmethod
    def differs_in_peft(cls, site: Site) -> str | None:
        if site.kind == "conv":
            return ("conv OFT: fxpeft rotates the conv weight over in·kh·kw (PEFT's merge, the identity at init); "
                    "PEFT 0.21's unmerged conv OFT rotates overlapping input patches and is not")
        return None

    @classmethod
    def build(cls, site: Site, config: OFTConfig, adapter_name: str, weight: torch.Tensor) -> OFTAdapter:
        adapter = OFTAdapter(site, adapter_name, config, adapter_dtype(weight, config.keep_base_dtype), weight.device)
        adapter.reset_parameters(config.init_weights)
        return adapter

    # ---------------------------------------------------------------------------------- graph
    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: OFTAdapter) -> None:
        def op(aten_op, *args, role: Role = Role.COMPUTE, label: str | None = None, replaces: int | None = None,
               **kwargs) -> fx.Node:
            return emit.op(aten_op, *args, role=role, label=label, replaces=replaces, **kwargs)

        dtype = adapter.oft_R.dtype
        base_dtype = emit.gm.get_parameter(site.weight).dtype
        q = emit.param("oft_R", Role.PARAM, label="oft_R")
        if hasattr(adapter, "coft"):  # projects the parameter in place, then reads it
            q = emit.module("coft", q, label="coft")
        q = op(aten.where.ScalarOther, emit.param("gate", Role.GATE, label="gate"), q, 0.0, label="q")  # off: R = I
        n, b = adapter.oft_R.shape[0], adapter.block  # rows of q (1 with block_share), block size
        skew = _skew(op, q, emit.param("upper_index", Role.PARAM, label="upper_index"), n, b)
        rot = _cayley(op, skew, emit.param("eye", Role.PARAM, label="eye"), n, adapter.fields["use_cayley_neumann"],
                      adapter.fields["num_cayley_neumann_terms"])  # R [n, b, b]
        if hasattr(adapter, "module_dropout"):  # training: some blocks are the identity for this call
            rot = emit.module("module_dropout", rot, role=Role.DROPOUT, label="module_dropout")
        call = emit.call
        # Rotating the weight (one matmul in the forward) is cheaper than rotating every token only in
        # inference: in training, R's gradient through W' = W·Bᵀ needs dL/dW' = gᵀ·x, a full [out, in] matmul
        # over the tokens (1.2x PEFT's step on the benchmark), where the input's rotation costs tokens·in·b.
        # So linear and embedding sites rotate the activations, as PEFT does; a conv reads its rotated weight.
        if (site.kind == "conv" and call.weight_node is not None and dtype == base_dtype
                and full_precision(dtype)):
            matrix = rot if site.kind == "embedding" else op(aten.transpose.int, rot, 1, 2, label="rotation_t")
            # Rotations do not commute: a later adapter rotates the weight the call reads now (earlier adapters'
            # rotations included), so the graph computes the folds in the order the merge applies them.
            current = next((arg for arg in call.node.all_input_nodes
                            if _base_and_reader(arg, site)[0] is call.weight_node), None)
            weight = _rotate_weight(op, current or emit.weight(), matrix, adapter.blocks, b,
                                    list(site.weight_shape), 0)  # W' = W · blockdiag(Rᵀ)
            if current is None:  # the call reads a transpose of W: rotate W itself
                emit.replace_input(call.weight_node, weight)
            else:
                _wire(emit, current, weight, reader=None)
            return
        cls._rotate_activations(emit, op, site, adapter, rot, dtype, base_dtype)

    @staticmethod
    def _rotate_activations(emit: Emit, op, site: Site, adapter: OFTAdapter, rot: fx.Node, dtype: torch.dtype,
                            base_dtype: torch.dtype) -> None:
        """PEFT's form: rotate a linear's input, an embedding's output (``[..., n, b]`` by ``R [n, b, b]``, one
        einsum), or add ``conv(x, W' - W)`` to a conv's output where the conv's weight cannot be replaced."""
        b = adapter.block
        if site.kind == "conv":
            # beside the call, not in its place: the adapter's own read, so merge_adapter does not take it for
            # another call site sharing the weight (a tie)
            w = emit.weight(own=True)
            if dtype != base_dtype:
                w = emit.cast(w, dtype)
            rotated = _rotate_weight(op, w, op(aten.transpose.int, rot, 1, 2, label="rotation_t"), adapter.blocks, b,
                                     list(site.weight_shape), None)
            apply_delta(emit, site, op(aten.sub.Tensor, rotated, w, label="delta_weight"), dtype, base_dtype)
            return
        linear = site.kind == "linear"
        # on the input side a later adapter rotates x first (innermost): x·B_new·B_old·Wᵀ is W·B_oldᵀ·B_newᵀ, the
        # order the merge folds them in
        value, reader = _base_and_reader(emit.call.input, site) if linear else (emit.call.node, None)
        v = emit.cast(value, dtype, role=Role.CAST, replaces=0) if dtype != base_dtype else value
        n = adapter.blocks
        flat = op(aten.reshape.default, v, [-1, n, b], label="blocks", replaces=0)  # [M, n, b] (M: the tokens)
        # one bmm per block over all tokens: a broadcast matmul of [..., n, 1, b] by [n, b, b] runs M·n tiny
        # products and reduces an expanded gradient for R (50x slower in training)
        by_block = op(aten.transpose.int, flat, 0, 1, label="blocks", replaces=0)  # [n, M, b]
        r = rot if adapter.oft_R.shape[0] == n else op(aten.expand.default, rot, [n, b, b], label="rotation")
        out = op(aten.bmm.default, by_block, r, label="rotated", replaces=0)  # [n, M, b] @ [n, b, b]
        out = op(aten.transpose.int, out, 0, 1, label="rotated", replaces=0)  # [M, n, b]
        last = dtype == base_dtype
        v = op(aten.reshape_as.default, out, v, label="rotated", replaces=0,
               role=Role.OUT if last else Role.COMPUTE)  # [..., n·b], the input's shape
        if not last:
            v = emit.cast(v, base_dtype, role=Role.OUT, replaces=0)
        if linear:
            _wire(emit, value, v, reader)
        else:
            emit.replace_output(v)

    @classmethod
    def fold(cls, adapter: OFTAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        m = adapter.block_matrix()
        return _rotate_weight(_eager, weight, m, adapter.blocks, adapter.block, list(weight.shape), None), bias

    @classmethod
    def unfold(cls, adapter: OFTAdapter, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        # R is orthogonal only up to the Neumann truncation: undo the fold with a solve, not with Mᵀ (in fp64).
        m = adapter.block_matrix().double()
        w = weight.double().reshape(weight.shape[0], adapter.blocks, adapter.block).transpose(0, 1)  # [n, rows, b]
        w = torch.linalg.solve(m.expand(adapter.blocks, -1, -1), w, left=False)  # X @ M = W'
        return w.transpose(0, 1).reshape(weight.shape).to(weight.dtype), bias

    # ---------------------------------------------------------------------------------- PEFT file format
    @staticmethod
    def _key(site: Site) -> str:
        return "oft_embedding_R.weight" if site.kind == "embedding" else "oft_R.weight"

    @classmethod
    def site_shapes(cls, config: OFTConfig, site: Site) -> dict[str, tuple[int, ...]]:
        n, b, _ = oft_blocks(config, _rotated_dim(site))
        return {cls._key(site): (1 if config.block_share else n, b * (b - 1) // 2)}

    @classmethod
    def site_tensors(cls, adapter: OFTAdapter, site: Site) -> dict[str, torch.Tensor]:
        return {cls._key(site): adapter.oft_R.detach()}

    @classmethod
    def load_site_tensors(cls, adapter: OFTAdapter, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            adapter.oft_R.copy_(tensors[cls._key(site)])

    @classmethod
    def swap_in(cls, adapter: OFTAdapter, site: Site, config: OFTConfig, tensors: dict[str, torch.Tensor]) -> None:
        if _settings(config, site) != adapter.settings:
            raise AdapterFileError(f"{site.name}: the file's OFT settings {_settings(config, site)} differ from the "
                                   f"adapter's {adapter.settings}; a hot-swap keeps the graph: use load_adapter")
        cls.load_site_tensors(adapter, site, tensors)

    @classmethod
    def site_settings(cls, config: OFTConfig, site: Site) -> dict[str, Any]:
        return _settings(config, site)

    @classmethod
    def adapter_settings(cls, adapter: OFTAdapter) -> dict[str, Any]:
        return dict(adapter.settings)

    @classmethod
    def config_fields(cls, adapters: dict[str, OFTAdapter], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        first = next(iter(adapters.values()))
        fields = {k: common_value(adapters, k, lambda m, k=k: m.fields[k]) for k in first.fields}
        # PEFT warns on a Cayley–Neumann file from before 0.18 (or without a version): this is 0.18's series
        return {**fields, "init_weights": True, "bias": "none", "fan_in_fan_out": False, "peft_version": "0.18.0",
                "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def config_from_peft(cls, fields: dict[str, Any]) -> OFTConfig:
        if "oft_block_size" not in fields:
            raise AdapterFileError("adapter_config.json has no oft_block_size: an OFT adapter from PEFT < 0.14, whose "
                                   "weights PEFT >= 0.14 (and fxpeft) cannot use; retrain it with a newer PEFT")
        config = config_from_fields(cls, fields)
        if config.use_cayley_neumann and _version(fields.get("peft_version", "0")) < (0, 18):
            warnings.warn("this OFT adapter uses the Cayley–Neumann series as PEFT < 0.18 computed it (or does not say "
                          "its PEFT version); PEFT 0.18 changed the series, so outputs may differ from training")
        return config
