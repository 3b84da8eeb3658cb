"""Adapter checkpoints for many processes: state dicts with DTensor shards, and ``torch.distributed.checkpoint``.

* :func:`adapter_state_dict` gives one adapter's tensors under PEFT's file keys (the keys
  :func:`fxpeft.save_adapter` writes); under ``fully_shard`` the values are the DTensor shards themselves, so
  DCP saves them without gathering. :func:`set_adapter_state_dict` loads such a dict back (DTensor or plain).
* :func:`save_adapter_dcp` / :func:`load_adapter_dcp` save and load it through DCP (``dcp.save``/``dcp.load``),
  resharding as DCP does: save with 2 processes, load with 1, or the other way. The checkpoint directory also
  holds the adapter's ``adapter_config.json`` (written by rank 0), so it describes itself.
* :func:`consolidate_adapter` turns such a checkpoint into the usual PEFT directory (``adapter_config.json`` +
  ``adapter_model.safetensors``) in one process, without a process group.

The same code runs with gloo on CPUs and NCCL on GPUs: nothing here names a backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import fx, nn
from torch.distributed.checkpoint.api import CheckpointException

from .atomic import replace_file
from .copies import load_copy_tensors
from .errors import AdapterFileError
from .io import (
    _PREFIX,
    CONFIG_NAME,
    WEIGHTS_NAME,
    _adapter_layout,
    _by_site,
    _commit,
    _few,
    _full,
    _gathered,
    _is_dtensor,
    _keyed_tensors,
    _Layout,
    _prepare_dir,
    _read_config,
    _tensor_writer,
    _text_writer,
)
from .passes.transaction import transaction
from .registry import PeftRegistry

__all__ = [
    "adapter_state_dict",
    "consolidate_adapter",
    "load_adapter_dcp",
    "save_adapter_dcp",
    "set_adapter_state_dict",
]

_METADATA = ".metadata"  # DCP's index of a checkpoint directory


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_alone() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process; that is the intent here."""
    with warnings.catch_warnings():
        if not _dist_on():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _resharded(gm: nn.Module) -> None:
    """Put every ``fully_shard`` module of ``gm`` back in its sharded state (after a forward the root stays
    unsharded), so its parameters are the DTensor shards: what a checkpoint reads and writes."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2: nothing can be sharded
        return
    for m in gm.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _as_file_shape(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``t`` in the file's shape: a DTensor of that shape stays sharded as it is; one that must be reshaped is
    gathered first (a reshape across shards is not a view)."""
    t = t.detach()
    if tuple(t.shape) == tuple(shape):
        return t
    return _full(t).reshape(shape)


def adapter_state_dict(gm: fx.GraphModule, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's file keys (``base_model.model.<site>.<key>``, as
    :func:`fxpeft.save_adapter` writes them), not copied.

    Under ``fully_shard`` the values are DTensors, sharded as the parameters are (gathered only where PEFT's
    layout reshapes a tensor), so ``torch.distributed.checkpoint`` saves each rank's shard. Call it on every rank.

    Args:
        gm: a rewritten graph, maybe under ``fully_shard``.
        adapter_name: which adapter.

    Returns:
        ``{file key: tensor}``; the tensors share memory with the adapter (detached): copy them to keep them.

    Raises:
        AdapterFileError: ``gm`` has no such adapter, or it cannot be expressed as one PEFT config.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> {k: tuple(t.shape) for k, t in fxpeft.adapter_state_dict(gm).items()}
        {'base_model.model.0.lora_A.weight': (2, 4), 'base_model.model.0.lora_B.weight': (4, 2)}
    """
    _resharded(gm)
    layout = _adapter_layout(gm, adapter_name)
    by_site = _by_site(layout, {**layout.mods, **layout.extra}, _as_file_shape)
    return _keyed_tensors(layout, by_site, lambda t: t.detach())


def _expected(layout: _Layout) -> dict[str, tuple]:
    """Every key of the adapter's state dict, with its (global) shape."""
    want = {f"{_PREFIX}{layout.names.get(n, n)}.{k}": tuple(shape) for n, per in layout.shapes.items()
            for k, shape in per.items()}
    want.update({k: tuple(t.shape) for k, t in _keyed_tensors(layout, {}, lambda t: t).items()})  # copies, shared
    return want


def _check_keys(have: dict[str, tuple], want: dict[str, tuple], where: str) -> None:
    """Keys and shapes of ``have`` (a state dict's, a checkpoint's) against the adapter's ``want``."""
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    wrong = [f"{k}: {where} {tuple(have[k])}, graph expects {want[k]}" for k in want
             if k in have and tuple(have[k]) != tuple(want[k])]
    msg = [f"{len(v)} {what}: {_few(v)}" for what, v in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                                                         ("shape mismatch(es)", wrong)) if v]
    if msg:
        raise AdapterFileError(f"the {where} does not fit this graph's adapter: " + "; ".join(msg)
                               + ". Is it another adapter's, or another model's? Nothing was changed")


def set_adapter_state_dict(gm: fx.GraphModule, state_dict: dict[str, torch.Tensor],
                           adapter_name: str = "default") -> None:
    """Load tensors keyed as :func:`adapter_state_dict` gives them into the adapter, in place.

    Values may be plain tensors or DTensors, and the graph's parameters sharded or not, in any combination;
    each adapter module is gathered, written and re-sharded in turn. Under ``fully_shard``, call it on every rank.
    Every key and shape is checked before anything is written.

    Raises:
        AdapterFileError: no such adapter, or a key is missing, unexpected or of another shape (the message names
            it); ``gm`` is unchanged.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> sd = {k: torch.ones_like(t) for k, t in fxpeft.adapter_state_dict(gm).items()}
        >>> fxpeft.set_adapter_state_dict(gm, sd)
        >>> bool(fxpeft.adapters(gm)["0.lora_default"].B.eq(1).all())
        True
    """
    _resharded(gm)
    layout = _adapter_layout(gm, adapter_name)
    _check_keys({k: tuple(t.shape) for k, t in state_dict.items()}, _expected(layout), "state dict")
    method = layout.method
    whole = {k: _full(t.detach()) for k, t in state_dict.items()}  # adapters are small: whole on every rank
    with torch.no_grad(), transaction(gm) as txn:
        for n, m in {**layout.mods, **layout.extra}.items():
            per = {k: whole[f"{_PREFIX}{layout.names.get(n, n)}.{k}"] for k in layout.shapes[n]}
            with _writing(m, txn):
                PeftRegistry.get(m.method).load_site_tensors(m, layout.sites[n], per)
        prefix = method.copies_prefix
        for m in layout.copies.values():
            with _writing(m, txn):
                load_copy_tensors({"": m}, {k[len(prefix):]: t for k, t in whole.items() if k.startswith(prefix)})
        if layout.shared is not None:
            with _writing(layout.shared, txn):
                method.load_shared_tensors(layout.shared, {k: whole[k] for k in method.shared_tensors(layout.shared)})


@contextlib.contextmanager
def _writing(module: nn.Module, txn) -> Iterator[None]:
    """Let a method's file hook write ``module`` as on one process: its DTensors are gathered for the block and
    each rank's shard is written back after it; plain tensors are written in place (and put back on error)."""
    for t in [*module.parameters(), *module.buffers()]:
        if not _is_dtensor(t):
            txn.will_write(t)
    with _gathered(module) as whole:
        yield
    if not whole:
        return
    from torch.distributed.tensor import distribute_tensor

    tensors = dict([*module.named_parameters(), *module.named_buffers()])
    for name, full in whole.items():
        t = tensors[name]
        # every rank holds the same whole tensor: each takes its own shard (no communication)
        t.to_local().copy_(distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local())


def save_adapter_dcp(gm: fx.GraphModule, checkpoint_dir: str | os.PathLike, adapter_name: str = "default") -> None:
    """Save one adapter with ``torch.distributed.checkpoint``: each rank writes its shards, rank 0 the metadata and
    ``adapter_config.json``. Call it on every rank (or in one process, without a process group).

    Load it with :func:`load_adapter_dcp` on any number of processes, or turn it into a PEFT directory with
    :func:`consolidate_adapter`.

    Raises:
        AdapterFileError: no such adapter, or it cannot be expressed as one PEFT config.

    Example:
        >>> import torch, fxpeft, tempfile, os
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> d = tempfile.mkdtemp(); fxpeft.save_adapter_dcp(gm, d)
        >>> sorted(f for f in os.listdir(d) if not f.startswith("_"))
        ['.metadata', 'adapter_config.json']
    """
    state = adapter_state_dict(gm, adapter_name)
    config = _adapter_layout(gm, adapter_name).config
    directory = _prepare_dir(checkpoint_dir) if _rank() == 0 else os.fspath(checkpoint_dir)
    with _quiet_alone():
        dcp.save(state, checkpoint_id=directory, no_dist=not _dist_on())  # a collective: returns when complete
    if _rank() == 0:
        replace_file(os.path.join(directory, CONFIG_NAME),
                     _text_writer(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    if _dist_on():
        dist.barrier()  # no rank reads the directory before the config is in it


def _checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, tuple]]:
    """A DCP adapter checkpoint's directory, config and ``{key: global shape}`` (checked to be one)."""
    directory = os.fspath(checkpoint_dir)
    if not os.path.isdir(directory):
        raise AdapterFileError(f"checkpoint directory {directory!r} does not exist")
    if not os.path.isfile(os.path.join(directory, _METADATA)):
        raise AdapterFileError(f"{directory!r} holds no {_METADATA}: it is not a torch.distributed.checkpoint "
                               "directory (a PEFT directory? load it with fxpeft.load_adapter)")
    config = _read_config(directory)
    try:
        meta = dcp.FileSystemReader(directory).read_metadata()
    except Exception as e:  # a truncated or foreign .metadata: pickle and format errors of every kind
        raise AdapterFileError(f"{os.path.join(directory, _METADATA)} is unreadable ({type(e).__name__}: {e}); "
                               "save the checkpoint again") from e
    shapes = {k: tuple(getattr(v, "size", ())) for k, v in meta.state_dict_metadata.items()}
    return directory, config, shapes


@contextlib.contextmanager
def _reading(directory: str) -> Iterator[None]:
    """Turn DCP's errors while reading the shard files (one missing, truncated) into a typed one."""
    try:
        yield
    except AdapterFileError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps every rank's errors in one (a BaseException)
        raise AdapterFileError(f"reading the checkpoint in {directory!r} failed: a shard file is missing or corrupt "
                               f"({type(e).__name__}: {str(e)[:300]}). Save it again. Nothing was changed") from e


def load_adapter_dcp(gm: fx.GraphModule, checkpoint_dir: str | os.PathLike, adapter_name: str = "default") -> None:
    """Load an adapter checkpoint written by :func:`save_adapter_dcp` (on any number of processes) into the
    adapter ``adapter_name`` of ``gm``, which must already hold it (rewrite with the same config first; under
    ``fully_shard``, shard first). Call it on every rank.

    The checkpoint's method, keys and shapes are checked against the adapter before anything is read into it,
    and the values go into copies first, so a failure leaves the adapter as it was.

    Raises:
        AdapterFileError: the directory is missing or not a DCP checkpoint, holds another method's adapter, or
            its names or shapes do not fit (the message names them); ``gm`` is unchanged.

    Example:
        >>> import torch, fxpeft, tempfile
        >>> lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> cfg = fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
        >>> a = fxpeft.rewrite(fxpeft.trace(lin), cfg); d = tempfile.mkdtemp(); fxpeft.save_adapter_dcp(a, d)
        >>> b = fxpeft.rewrite(fxpeft.trace(lin), fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> fxpeft.load_adapter_dcp(b, d); x = torch.randn(2, 4); torch.equal(a(x), b(x))
        True
    """
    directory, config, shapes = _checkpoint(checkpoint_dir)
    layout = _adapter_layout(gm, adapter_name)
    if str(config.get("peft_type", "")).lower() != layout.method.name:
        raise AdapterFileError(f"{directory!r} holds a {config.get('peft_type')!r} adapter; {adapter_name!r} is "
                               f"{layout.method.name.upper()}. Nothing was changed")
    _check_keys(shapes, _expected(layout), "checkpoint")
    target = {k: torch.empty_like(t) for k, t in adapter_state_dict(gm, adapter_name).items()}  # sharded alike
    with _reading(directory), _quiet_alone():
        dcp.load(target, checkpoint_id=directory, no_dist=not _dist_on())  # into copies: gm is untouched so far
    set_adapter_state_dict(gm, target, adapter_name)


def consolidate_adapter(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Write a DCP adapter checkpoint (from :func:`save_adapter_dcp`) as a PEFT-format directory
    (``adapter_config.json`` + ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` and
    :func:`fxpeft.load_adapter` read. Runs in one process, without a process group or a graph.

    Returns:
        The files written.

    Raises:
        AdapterFileError: the checkpoint is missing, not a DCP adapter checkpoint, or holds NaN/inf.

    Example:
        >>> import torch, fxpeft, tempfile
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> d = tempfile.mkdtemp(); fxpeft.save_adapter_dcp(gm, d)
        >>> fxpeft.consolidate_adapter(d, tempfile.mkdtemp())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    directory, config, shapes = _checkpoint(checkpoint_dir)
    if not shapes:
        raise AdapterFileError(f"the checkpoint in {directory!r} holds no tensors")
    tensors: dict[str, Any] = {}
    # no process group: read every tensor whole, as DCP's own dcp_to_torch_save does
    with _reading(directory):
        _load_state_dict(tensors, storage_reader=dcp.FileSystemReader(directory),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    bad = [k for k, t in tensors.items() if not isinstance(t, torch.Tensor)
           or (t.is_floating_point() and not bool(torch.isfinite(t).all()))]
    if bad:
        raise AdapterFileError(f"the checkpoint in {directory!r} holds NaN/inf or non-tensor values in {_few(bad)}; "
                               "the adapter diverged or the checkpoint is corrupt")
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    _commit(_prepare_dir(out_dir), [(WEIGHTS_NAME, _tensor_writer(tensors)),
                                    (CONFIG_NAME, _text_writer(json.dumps(config, indent=2, sort_keys=True) + "\n"))])
    return [CONFIG_NAME, WEIGHTS_NAME]
