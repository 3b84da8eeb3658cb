"""Base weights after the graph: build and trace a model on the meta device, then stream its checkpoint in.

A model that does not fit in memory can still be traced and inspected: build it under :func:`empty_weights`
(parameters on the meta device, buffers real, as ``accelerate.init_empty_weights`` does), trace it, then
:func:`load_weights` reads an HF safetensors checkpoint (one ``model.safetensors``, or shards listed by
``model.safetensors.index.json``) one tensor at a time into the graph's parameters. Peak memory is the model
itself plus the shard being read: each shard is memory-mapped, copied tensor by tensor, and closed.

Names are the model's own ``state_dict`` names: ``torch.export``'s ``ep.module()`` and ``symbolic_trace`` keep
them, so a checkpoint that ``model.save_pretrained`` (or :func:`fxpeft.save_merged`) wrote fits the traced graph.
Weights tied in the model (an output head sharing the embedding) are one parameter in the graph; a checkpoint
that stores it once, under either name, fills both.

The graph can be rewritten before its weights load: adapters are initialised where they land, with the same
seeds as a rewrite of the loaded graph. A rewrite on meta weights records what it built (a
:class:`~fxpeft.tags.PendingBuild` in the graph's info, with the RNG state it started from); once the base is in,
:func:`load_weights` runs the same build again under that state (PiSSA's residual is then taken from the loaded
weight) and moves the values into the adapter modules. Calling a graph whose weights are still on meta is a
:class:`~fxpeft.WeightsError` naming :func:`load_weights`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch
from torch import fx, nn

from .errors import WeightsError
from .registry import AdapterModule
from .tags import PendingBuild, graph_info, set_graph_info

__all__ = ["empty_weights", "load_weights", "meta_tensors"]

_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory) and their buffers real.

    Buffers stay real because a checkpoint does not hold the non-persistent ones a model computes in its
    constructor (rotary frequencies, position ids); parameters are what :func:`load_weights` fills in.

    Example:
        >>> import torch, fxpeft
        >>> with fxpeft.empty_weights():
        ...     lin = torch.nn.Linear(4, 2)
        >>> lin.weight.device.type
        'meta'
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of the module's parameters and buffers that are still on the meta device (not loaded).

    Example:
        >>> import torch, fxpeft
        >>> with fxpeft.empty_weights():
        ...     lin = torch.nn.Linear(4, 2)
        >>> fxpeft.meta_tensors(lin)
        ['weight', 'bias']
    """
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [n for n, t in named if t.is_meta]


def _shard_map(directory: str) -> dict[str, str]:
    """Checkpoint tensor name -> the shard file holding it."""
    index = os.path.join(directory, _INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{index} is not a safetensors index ({e}); re-save the checkpoint "
                               "(model.save_pretrained or fxpeft.save_merged)") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsError(f"{index}: 'weight_map' must map tensor names to shard file names")
        return dict(weight_map)
    single = os.path.join(directory, _SINGLE)
    if not os.path.isfile(single):
        raise WeightsError(f"{directory!r} holds neither {_SINGLE} nor {_INDEX}; point load_weights at a directory "
                           "that model.save_pretrained (safetensors) or fxpeft.save_merged wrote")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: _SINGLE for k in f.keys()}


def _added(gm: nn.Module) -> dict[str, nn.Module]:
    """The submodules fxpeft added (adapters, and state one adapter's sites share), by path: not in a checkpoint."""
    from .registry import AdapterModule, Method

    adapters = {p: m for p, m in gm.named_modules() if isinstance(m, AdapterModule)}
    shared = {Method.shared_path(m.method, m.adapter_name) for m in adapters.values()}
    return {**adapters, **{p: gm.get_submodule(p) for p in shared if hasattr(gm, p)}}


def _replayed(gm: nn.Module, path: str, module: nn.Module) -> bool:
    """Whether a pending build (:func:`_build_pending`) gives this added module its values."""
    from .copies import FullCopy
    from .registry import Method

    for b in graph_info(gm).pending_builds:
        if (isinstance(module, AdapterModule) and module.adapter_name == b.adapter
                and (isinstance(module, FullCopy) or module.method == b.method)
                or path == Method.shared_path(b.method, b.adapter)):
            return True
    return False


def _owners(gm: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """Every base parameter / persistent buffer name (aliases included) -> (owning module, attribute, tensor)."""
    added = {id(t) for m in _added(gm).values() for t in [*m.parameters(), *m.buffers()]}
    out = {}
    for prefix, mod in gm.named_modules(remove_duplicate=False):
        for attr, t in mod._parameters.items():
            if t is not None and id(t) not in added:
                out[f"{prefix}.{attr}" if prefix else attr] = (mod, attr, t)
        for attr, t in mod._buffers.items():
            if t is not None and id(t) not in added and attr not in mod._non_persistent_buffers_set:
                out[f"{prefix}.{attr}" if prefix else attr] = (mod, attr, t)
    return out


def _plan(gm: nn.Module, directory: str, strict: bool) -> tuple[dict[str, list[str]], dict[int, list[tuple]]]:
    """Check names, shards and shapes before anything is read; return shard -> names, and per tensor its owners."""
    from safetensors import safe_open

    on_meta = [p for p, m in _added(gm).items() if meta_tensors(m) and not _replayed(gm, p, m)]
    if on_meta:
        raise WeightsError(f"{len(on_meta)} adapter module(s) on the meta device (first: {on_meta[:2]}) have no "
                           "record of how they were built (a graph from another fxpeft version?), so they get no "
                           "initial values; load the base weights first, then rewrite: "
                           "fxpeft.rewrite(fxpeft.load_weights(gm, directory), config)")
    shard_of = _shard_map(directory)
    owners = _owners(gm)
    by_tensor: dict[int, list[tuple]] = {}
    for name, (mod, attr, t) in owners.items():
        by_tensor.setdefault(id(t), []).append((name, mod, attr, t))
    missing = [ns[0][0] for ns in by_tensor.values() if not any(n in shard_of for n, *_ in ns)]
    if missing:
        raise WeightsError(f"the checkpoint in {directory!r} has no tensor for {len(missing)} of the graph's weights "
                           f"(first: {missing[:4]}); is it this model's checkpoint?")
    unexpected = sorted(set(shard_of) - set(owners))
    if unexpected and strict:
        raise WeightsError(f"the checkpoint holds {len(unexpected)} tensor(s) the graph has no place for (first: "
                           f"{unexpected[:4]}); pass strict=False to skip them")
    shards: dict[str, list[str]] = {}
    for ns in by_tensor.values():
        name = next(n for n, *_ in ns if n in shard_of)
        shards.setdefault(shard_of[name], []).append(name)
    for shard, names in shards.items():
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise WeightsError(f"shard {shard!r} listed in {_INDEX} is missing from {directory!r}; copy it there or "
                               "re-save the checkpoint")
        with safe_open(path, framework="pt") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                want = tuple(owners[name][2].shape)
                if shape != want:
                    raise WeightsError(f"{name}: the checkpoint's tensor is {list(shape)}, the graph's is {list(want)}; "
                                       "the checkpoint belongs to another model configuration")
    return shards, by_tensor


def load_weights(gm: fx.GraphModule, directory: str | os.PathLike, *, device: str | torch.device = "cpu",
                 strict: bool = True) -> fx.GraphModule:
    """Stream an HF safetensors checkpoint into ``gm``'s parameters and persistent buffers, in place.

    Every name, shard and shape is checked before a byte is copied. Then each shard is opened (memory-mapped),
    its tensors are copied one at a time, cast to the graph tensor's dtype and placed on ``device``, and the shard
    is closed. A tensor's aliases (tied weights) all get the loaded one. Adapters rewritten onto the meta weights
    then get the initial values a rewrite of the loaded graph would give them (same RNG state, same draws). If
    anything fails midway, every tensor already replaced is put back: the graph is left as it was.

    Args:
        gm: a traced graph (typically built under :func:`empty_weights` and traced on the meta device).
        directory: holds ``model.safetensors`` or ``model.safetensors.index.json`` and its shards.
        device: where the loaded tensors go.
        strict: refuse a checkpoint with tensors the graph has no place for (default); False skips them.

    Returns:
        ``gm``, its weights loaded.

    Raises:
        WeightsError: no checkpoint, a missing shard, a graph weight the checkpoint lacks, a shape mismatch, or
            (``strict``) tensors the graph does not have.

    Example:
        >>> import torch, fxpeft, tempfile
        >>> from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp(); real = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> save_file(real.state_dict(), f"{d}/model.safetensors")
        >>> with fxpeft.empty_weights():
        ...     empty = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> gm = fxpeft.load_weights(fxpeft.trace(empty), d)
        >>> x = torch.randn(3, 4); bool((gm(x) == real(x)).all())
        True

        Rewrite first, load after: the adapters come out as a rewrite of the loaded graph makes them.

        >>> cfg = fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
        >>> with fxpeft.empty_weights():
        ...     empty = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> _ = torch.manual_seed(0); early = fxpeft.rewrite(fxpeft.trace(empty), cfg)
        >>> len(fxpeft.meta_tensors(early)) > 0
        True
        >>> _ = torch.manual_seed(0); late = fxpeft.rewrite(fxpeft.trace(real), cfg)
        >>> bool((fxpeft.load_weights(early, d)(x) == late(x)).all())
        True
    """
    from safetensors import safe_open

    from .passes.transaction import transaction

    directory = os.fspath(directory)
    shards, by_tensor = _plan(gm, directory, strict)
    aliases = {name: ns for ns in by_tensor.values() for name, *_ in ns}
    # all or nothing: the transaction puts back every module table entry (loaded weights, adapter values), the
    # base updates, the graph's device constants and the pending builds if anything below fails
    with transaction(gm) as txn:
        for shard, names in shards.items():
            with safe_open(os.path.join(directory, shard), framework="pt", device="cpu") as f:
                for name in names:
                    _replace(aliases[name], f.get_tensor(name), device)
        _build_pending(gm, txn)
        _retarget(gm, torch.device(device))
    _unguard(gm)
    return gm


def _build_pending(gm: fx.GraphModule, txn) -> None:
    """Give the adapters rewritten on meta weights their initial values, now that the base is loaded: replay each
    recorded build in order, under the RNG state it started from, and move the values into the adapter modules.

    A build that started where the previous one ended (nothing drew from the RNG in between) continues from the
    state the previous replay left, as consecutive rewrites of a loaded graph would. The caller's RNG is kept.
    """
    info = graph_info(gm)
    if not info.pending_builds:
        return
    caller = torch.random.get_rng_state()
    try:
        prev = None
        for rec in info.pending_builds:
            if prev is None or rec.rng != prev.rng_after:
                torch.random.set_rng_state(torch.frombuffer(bytearray(rec.rng), dtype=torch.uint8))
            _replay(gm, rec, txn)
            prev = rec
    finally:
        torch.random.set_rng_state(caller)
    info.pending_builds = ()
    set_graph_info(gm, info)


def _replay(gm: fx.GraphModule, rec: PendingBuild, txn) -> None:
    """Rebuild one recorded adapter on the loaded base and move its values into the graph's adapter modules."""
    from .copies import FullCopy
    from .passes.inject import build_adapters
    from .registry import Method, PeftRegistry
    from .sites import CALL_KINDS, find_sites

    method = PeftRegistry.get(rec.method)
    found = find_sites(gm, CALL_KINDS | method.site_kinds)
    lost = [n for n, _ in rec.sites if n not in found]
    if lost:
        raise WeightsError(f"adapter {rec.adapter!r} was built on meta weights at sites the graph no longer has "
                           f"(first: {lost[0]!r}); rewrite the loaded graph instead")
    adapters, shared, updates = build_adapters(gm, method, rec.config, rec.adapter, [found[n] for n, _ in rec.sites])
    # PiSSA/OLoRA: the loaded base keeps the residual (as a rewrite of it would, even if the adapter was deleted since)
    for weight, value in updates.items():
        txn.replace_data(gm.get_parameter(weight), value)
    for site, path in rec.sites:
        held = _module_at(gm, path)
        if isinstance(held, AdapterModule) and held.adapter_name == rec.adapter:  # not deleted since
            _take_values(held, adapters[site])
            held._sync()  # run-time buffers (scale) follow the gate the user may have set meanwhile
    own = _module_at(gm, Method.shared_path(rec.method, rec.adapter))
    if shared is not None and own is not None:
        _take_values(own, shared)
    for m in gm.modules():  # modules_to_save / trained biases: copies of the now loaded base tensors
        if isinstance(m, FullCopy) and m.adapter_name == rec.adapter:
            for rel, base in m.bases.items():
                parent, _, leaf = rel.rpartition(".")
                _take_values(m.values.get_submodule(parent) if parent else m.values,
                             {leaf: _tensor_at(gm, base).detach().clone()}, recurse=False)


def _module_at(gm: nn.Module, path: str) -> nn.Module | None:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def _tensor_at(gm: nn.Module, path: str) -> torch.Tensor:
    parent, _, leaf = path.rpartition(".")
    mod = gm.get_submodule(parent) if parent else gm
    return getattr(mod, leaf)


def _take_values(held: nn.Module, built: nn.Module | dict[str, torch.Tensor], recurse: bool = True) -> None:
    """Replace every meta parameter / buffer of ``held`` by the built module's tensor of the same name, keeping
    the flags the base freeze set (``requires_grad``); tensors with values (the gate) stay."""
    pairs = ([(held.get_submodule(p) if p else held, sub) for p, sub in built.named_modules()]
             if isinstance(built, nn.Module) and recurse else [(held, built)])
    for mod, src in pairs:
        values = src if isinstance(src, dict) else {**src._parameters, **src._buffers}
        for table in (mod._parameters, mod._buffers):
            for attr, t in table.items():
                if t is not None and t.is_meta:
                    new = values[attr].detach()
                    table[attr] = nn.Parameter(new, requires_grad=t.requires_grad) if table is mod._parameters else new


def _retarget(gm: fx.GraphModule, device: torch.device) -> None:
    """Point the graph's own device constants at ``device``: a graph traced on meta weights records ``meta`` in
    ops that name a device (export's ``_assert_tensor_metadata`` checks, ``arange``/``_to_copy`` targets)."""
    def swap(a):
        return device if isinstance(a, torch.device) and a.type == "meta" else a

    changed = False
    for node in gm.graph.nodes:
        args, kwargs = fx.node.map_aggregate(node.args, swap), fx.node.map_aggregate(node.kwargs, swap)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs, changed = args, kwargs, True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _replace(owners: list[tuple], value: torch.Tensor, device: str | torch.device) -> None:
    """Give one graph tensor (all its aliases) the loaded ``value``, in its dtype, on ``device``."""
    old = owners[0][3]
    value = value.to(device=device, dtype=old.dtype)
    new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
    for _, mod, attr, t in owners:
        is_param = attr in mod._parameters and mod._parameters[attr] is t
        (mod._parameters if is_param else mod._buffers)[attr] = new


# ------------------------------------------------------------------------- running a graph before its weights


def guard_unloaded(gm: nn.Module) -> None:
    """Make calling ``gm`` while its parameters are on the meta device a :class:`~fxpeft.WeightsError` naming
    :func:`load_weights` (instead of an error deep in an op). A forward pre-hook: graphs with real weights never
    get one, and :func:`load_weights` removes it. It is a module-level function, so it survives pickling."""
    if not any(h is _refuse_unloaded for h in gm._forward_pre_hooks.values()):
        gm.register_forward_pre_hook(_refuse_unloaded, with_kwargs=True)


def _unguard(gm: nn.Module) -> None:
    for key in [k for k, h in gm._forward_pre_hooks.items() if h is _refuse_unloaded]:
        del gm._forward_pre_hooks[key]
        gm._forward_pre_hooks_with_kwargs.pop(key, None)


def _refuse_unloaded(gm: nn.Module, args: tuple, kwargs: dict) -> None:
    from torch.utils._pytree import tree_leaves

    # meta inputs run a shape check and fake ones a trace (their types are subclasses): only real data is refused
    real = any(type(t) in (torch.Tensor, nn.Parameter) and not t.is_meta for t in tree_leaves((args, kwargs)))
    if not real:
        return
    on_meta = [n for n, p in gm.named_parameters() if p.is_meta]
    if not on_meta:  # loaded some other way (load_state_dict(assign=True)): nothing to guard any more
        _unguard(gm)
        return
    raise WeightsError(f"{len(on_meta)} of the graph's parameters are still on the meta device (first: "
                       f"{on_meta[:3]}), so it cannot run; load them first: fxpeft.load_weights(gm, directory)")
