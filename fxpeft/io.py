"""Adapters as files, in HF PEFT's format (both ways), and merged checkpoints that transformers loads.

* :func:`save_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as PEFT's
  ``save_pretrained`` lays them out, so ``peft.PeftModel.from_pretrained`` (and anything that reads PEFT
  adapters) loads them;
* :func:`load_adapter` reads a directory written by fxpeft **or by PEFT**, checks every key, shape, value and
  config field against the graph *before* touching it, then rewrites the graph and loads the weights;
* :func:`save_merged` writes a merged graph's weights under the original model's parameter names, sharded by
  size with HF's ``model.safetensors.index.json``.

This module only moves bytes and checks them: each method's file says its tensor keys and config fields
(:meth:`fxpeft.Method.site_tensors`, :meth:`~fxpeft.Method.config_fields`, :meth:`~fxpeft.Method.config_from_peft`).
Tensors live under ``base_model.model.<site>.<key>``.

Only safetensors is read or written: no load path unpickles anything. A directory holding only PEFT's legacy
``adapter_model.bin`` is refused with the two lines that convert it. Config files are untrusted: JSON depth
and size are bounded, regexes run on a linear-time engine, and every field is type-checked.

Saves are atomic for the whole directory (:mod:`fxpeft.atomic`): concurrent writers end with exactly one
writer's complete set of files, a killed save leaves the previous set (or a set that refuses to load), and
the next save removes the temporary files of dead writers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import re
import warnings
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import fx, nn
from torch.nn.utils.stateless import _reparametrize_module

from .atomic import commit_files, read_lock, verify_files
from .copies import (FullCopy, copy_config_fields, copy_tensors, load_copy_tensors, plan_copies, saved_modules,
                     site_adapters, take_copy_tensors)
from .errors import AdapterFileError, FxPeftError, MergeError, TargetError, WeightsError
from .pipeline import rewrite_graph
from .passes.inject import adapter_modules
from .passes.outline import on_flat_graph
from .passes.transaction import transaction
from .registry import AdapterModule, Method, PeftRegistry
from .sites import CALL_KINDS, SITE_KINDS, Site, find_sites
from .tags import graph_info
from .targeting import TASK_MODULES, matches, saved_names, select_sites
from .untrusted import load_json

__all__ = ["save_adapter", "load_adapter", "hotswap_adapter", "prepare_for_hotswap", "save_merged", "config_from_peft",
           "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LEGACY_WEIGHTS = "adapter_model.bin"
_INDEX = "model.safetensors.index.json"
_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------------ bytes


def _text_writer(text: str) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write


def _tensor_writer(tensors: dict[str, torch.Tensor]) -> Callable[[str], None]:
    return lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(path)  # safetensors: a JSON header and raw bytes, never pickle
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or corrupt. "
            "Re-save or re-download it.") from e
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterFileError(f"{path} holds NaN or inf values in {_few(bad)}; the adapter diverged or the file is "
                               "corrupt. Re-save it from a good checkpoint.")
    return tensors


def _prepare_dir(directory: str | os.PathLike) -> str:
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise AdapterFileError(f"{directory!r} exists and is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise AdapterFileError(f"cannot create the directory {directory!r}: {e.strerror}") from None
    return directory


def _commit(directory: str, files: list, stale: Callable[[str], bool] | None = None) -> None:
    try:
        commit_files(directory, files, stale=stale)
    except OSError as e:
        raise AdapterFileError(f"cannot write into {directory!r}: {e.strerror or e}; check the path and its "
                               "permissions. The previous files are intact") from None


def _few(items: list, n: int = 5) -> str:
    return ", ".join(map(str, items[:n])) + (f" (and {len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------------- PEFT's naming rules


def _exact_regex(names) -> str:
    """A regex that full-matches exactly ``names`` (given to fxpeft's own config, so it adapts just those)."""
    return "|".join(f"(?:{re.escape(n)})" for n in sorted(names))


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]  # shortest first


def _short_keys(wanted: dict[str, Any], universe: dict[str, Any]) -> list[str]:
    """The shortest dotted suffixes that select exactly the entries of ``wanted`` that share a value.

    A suffix is usable for a name when every name of ``universe`` it matches (PEFT's list rule) carries the
    same value as that name. Returns keys in the order their names come.
    """
    matched_by: dict[str, list[str]] = {}
    for n in universe:
        for suf in _suffixes(n):
            matched_by.setdefault(suf, []).append(n)
    keys: list[str] = []
    covered: set[str] = set()
    for name, value in wanted.items():
        if name in covered:
            continue
        for suf in _suffixes(name):
            if all(universe[n] == value for n in matched_by.get(suf, ())):
                keys.append(suf)
                covered.update(matched_by.get(suf, ()))
                break
    return keys


def _pattern_keys(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """``rank_pattern``-style keys for the sites whose value is not ``default`` (escaped dotted suffixes)."""
    odd = {n: v for n, v in values.items() if v != default}
    keys = _short_keys(odd, values)
    return {re.escape(k): next(v for n, v in odd.items() if matches([k], n)) for k in keys}


def _module_names(gm: fx.GraphModule, sites: dict[str, Site]) -> set[str]:
    """Every module path fxpeft can see in the base model (what PEFT's target matching runs over)."""
    names = set(sites)
    for n in gm.graph.nodes:
        for path, _ in (n.meta.get("nn_module_stack") or {}).values():
            if path:
                names.add(path)
    adapter_roots = [p for p, m in gm.named_modules() if isinstance(m, AdapterModule)]
    for p, _ in gm.named_modules():
        if p and not any(p == a or p.startswith(a + ".") for a in adapter_roots):
            names.add(p)
    return names


def _warn_differences(method: type[Method], sites: list[Site], direction: str) -> None:
    """Warn about sites whose adapter PEFT would apply differently (or not at all) from the same file."""
    def outside_owner(site: Site) -> bool:  # the weight is also read by code outside its module's own call
        for call in site.calls:
            stack = call.node.meta.get("nn_module_stack")
            if call.node.op != "call_module" and stack and list(stack.values())[-1][0] != site.name:
                return True
        return any(c.node.op == "call_module" for c in site.calls) and any(c.node.op != "call_module" for c in site.calls)

    reasons: dict[str, list[str]] = {}
    for s in sites:
        if s.kind == "parameter":  # PEFT's target_parameters: adapted before all uses there too
            why = method.differs_in_peft(s)
        elif not s.weight.endswith(".weight") or s.name == s.weight:
            why = ("site(s) that are bare parameters (e.g. nn.MultiheadAttention.in_proj_weight): PEFT's module-based "
                   "adapters cannot hold them and skip them or refuse the file")
        elif outside_owner(s):
            why = ("site(s) whose weight is also applied outside its module's own forward (fxpeft adapts every call, "
                   "PEFT only the module call)")
        else:
            why = method.differs_in_peft(s)
        if why:
            reasons.setdefault(why, []).append(s.name)
    for why, hit in reasons.items():
        warnings.warn(f"{direction}: {why}: {hit[:3]}; the same file gives different outputs in PEFT "
                      "(fxpeft's own save/load round trip is exact)")


def _model_class(gm: fx.GraphModule) -> str | None:
    """The traced model's class name (recorded by :func:`fxpeft.trace`; else read off the graph's class)."""
    name = type(gm).__name__
    return graph_info(gm).model_class or (name.removesuffix("Graph") if name.endswith("Graph") else None)


# --------------------------------------------------------------------------------------------- save_adapter


def _file_copy(t: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A file's own copy of an adapter tensor: detached, on the CPU, in PEFT's shape, contiguous."""
    t = t.detach().to("cpu")
    return (t if shape is None else t.reshape(shape)).contiguous().clone()


@dataclasses.dataclass
class _Layout:
    """Where one adapter's tensors go in PEFT's file: its config, and per site its method's keys and shapes."""

    method: type[Method]
    config: dict[str, Any]
    mods: dict[str, AdapterModule]  # site -> the adapter's module there (the primary method)
    extra: dict[str, AdapterModule]  # site -> a companion adapter (Method.companions)
    copies: dict[str, FullCopy]  # path -> modules_to_save / trained-bias copy
    sites: dict[str, Site]
    shapes: dict[str, dict[str, tuple]]  # site -> PEFT key suffix -> shape in the file
    names: dict[str, str]  # site -> the module path its tensors sit under in the file
    shared: nn.Module | None  # the state every site of the adapter reads (VeRA's matrices), if any


def _adapter_layout(gm: fx.GraphModule, adapter_name: str) -> _Layout:
    """Adapter ``adapter_name``'s PEFT file layout: its config, checked to select exactly its sites again."""
    own = {p: m for p, m in adapter_modules(gm).items() if m.adapter_name == adapter_name}
    mods = {m.site_name: m for m in site_adapters(own).values()}
    copies = {p: m for p, m in own.items() if isinstance(m, FullCopy)}  # modules_to_save, trained biases
    if not mods:
        have = sorted({m.adapter_name for m in adapter_modules(gm).values()})
        raise AdapterFileError(f"the graph holds no adapter named {adapter_name!r} (it holds {have}); "
                               "pass adapter_name=, or rewrite the graph first")
    # companions (another method's adapters that the primary config asked for beside its own: Method.companions)
    # are written under the primary's config and keys
    extra = {n: m for n, m in mods.items() if m.companion}
    mods = {n: m for n, m in mods.items() if not m.companion}
    if not mods:
        raise AdapterFileError(f"adapter {adapter_name!r} holds only companion adapters, without the config that "
                               "asked for them; it cannot be written as a PEFT adapter")
    methods = {m.method for m in mods.values()}
    if len(methods) > 1:
        raise AdapterFileError(f"adapter {adapter_name!r} mixes methods {sorted(methods)}; one PEFT adapter file holds "
                               "one method. Give each method its own adapter name")
    method = PeftRegistry.get(methods.pop())
    sites = find_sites(gm, CALL_KINDS | method.site_kinds)
    lost = [s for s in mods if s not in sites]
    if lost:
        raise AdapterFileError(f"adapter sites {lost[:3]} are no longer call sites of this graph; was it edited by hand?")
    config = _config_for(gm, method, mods, sites, copies)
    for m_name in sorted({m.method for m in extra.values()}):
        config.update(PeftRegistry.get(m_name).companion_fields(
            {n: m for n, m in extra.items() if m.method == m_name}, sites))
    shapes = _check_round_trip(gm, method, config, mods, sites, copies)
    shapes.update(_companion_round_trip(gm, method, config, extra, sites))
    names = method.file_names(gm, [sites[n] for n in mods])
    shared = getattr(gm, Method.shared_path(method.name, adapter_name), None)
    return _Layout(method, config, mods, extra, copies, sites, shapes, names, shared)


def _by_site(layout: _Layout, mods: dict[str, AdapterModule],
             take: Callable[[torch.Tensor, tuple], torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``take(tensor, file shape)`` of each site's tensors (its method's :meth:`~fxpeft.Method.site_tensors`)."""
    return {n: {k: take(t, layout.shapes[n][k]) for k, t in PeftRegistry.get(m.method).site_tensors(
        m, layout.sites[n]).items()} for n, m in mods.items()}


def _keyed_tensors(layout: _Layout, by_site: dict[str, dict[str, torch.Tensor]],
                   take: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the file under its key: the sites' (``by_site``), then the full copies' and the shared
    state's (through ``take``)."""
    tensors = {f"{_PREFIX}{layout.names.get(n, n)}.{k}": t for n, per in by_site.items() for k, t in per.items()}
    tensors.update({layout.method.copies_prefix + k: take(t) for k, t in copy_tensors(layout.copies).items()})
    if layout.shared is not None:  # under the method's own keys
        tensors.update({k: take(t) for k, t in layout.method.shared_tensors(layout.shared).items()})
    return tensors


@on_flat_graph  # an outlined graph (fxpeft.passes.OutlineBlocks) is inlined for the call
def save_adapter(gm: fx.GraphModule, directory: str | os.PathLike, adapter_name: str = "default", *,
                 convert_to_original_base: bool = False,
                 path_initial_model_for_weight_conversion: str | os.PathLike | None = None) -> None:
    """Write one adapter of ``gm`` as ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's layout.

    ``peft.PeftModel.from_pretrained(model, directory)`` loads the result on the original model class.
    ``target_modules`` is written as the shortest module-name suffixes that select exactly the adapted sites;
    per-site values (ranks, alphas) become the method's pattern fields. The directory is written atomically.

    Args:
        gm: a rewritten graph.
        directory: created if missing; existing adapter files in it are replaced.
        adapter_name: which adapter of ``gm`` to write (the file itself holds no adapter name, as in PEFT).
        convert_to_original_base: for an adapter whose init changed the base weights (PiSSA, OLoRA), write instead
            the adapter that gives the same model on the *original* base weights (the method's
            :meth:`~fxpeft.Method.convert_to_original_base`, from the initial tensors the adapter kept).
        path_initial_model_for_weight_conversion: PEFT's form of the same: the directory of the adapter as it was
            initialised (saved before training); its tensors are the initial ones. The directory is only read.

    Raises:
        AdapterFileError: ``gm`` has no such adapter, it cannot be expressed as one PEFT config, a conversion is
            asked of an adapter without one (or with an initial adapter that does not fit), or the directory cannot
            be written.

    Example:
        >>> import torch, fxpeft, tempfile, os
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> d = tempfile.mkdtemp(); fxpeft.save_adapter(gm, d)
        >>> sorted(f for f in os.listdir(d) if not f.startswith("."))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    layout = _adapter_layout(gm, adapter_name)
    method, config, mods, sites = layout.method, layout.config, layout.mods, layout.sites
    by_site = _by_site(layout, mods, _file_copy)
    if convert_to_original_base or path_initial_model_for_weight_conversion is not None:
        initial = _initial_tensors(method, mods, sites, by_site, path_initial_model_for_weight_conversion,
                                   convert_to_original_base)
        config, by_site = method.convert_to_original_base(config, by_site, initial)
    by_site.update(_by_site(layout, layout.extra, _file_copy))
    tensors = {k: t.contiguous() for k, t in _keyed_tensors(layout, by_site, _file_copy).items()}
    _warn_differences(method, [sites[n] for n in mods], "save_adapter")
    _commit(_prepare_dir(directory), [(WEIGHTS_NAME, _tensor_writer(tensors)),
                                      (CONFIG_NAME, _text_writer(json.dumps(config, indent=2, sort_keys=True) + "\n"))])


def _initial_tensors(method: type[Method], mods: dict[str, AdapterModule], sites: dict[str, Site],
                     by_site: dict[str, dict[str, torch.Tensor]], path: str | os.PathLike | None,
                     own: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Each site's tensors as initialised: kept by the adapter (``own``), or read from PEFT's initial adapter
    directory ``path``; checked against the keys and shapes of the tensors being saved."""
    if own and path is not None:
        raise AdapterFileError("pass convert_to_original_base=True or path_initial_model_for_weight_conversion, not "
                               "both: the first uses the initial tensors the adapter kept")
    if own:
        initial = {n: method.initial_site_tensors(m, sites[n]) for n, m in mods.items()}
        missing = [n for n, t in initial.items() if t is None]
        if missing:
            raise AdapterFileError(f"site(s) {_few(missing)} kept no initial tensors: their init did not change the "
                                   "base weights, so the adapter applies to the original base as it is; save it "
                                   "without convert_to_original_base")
        found = {n: {k: t.detach().to("cpu") for k, t in per.items()} for n, per in initial.items()}
    else:
        config, tensors = _open_adapter_dir(path)
        if str(config.get("peft_type", "")).lower() != method.name:
            raise AdapterFileError(f"the initial adapter in {os.fspath(path)!r} is of peft_type "
                                   f"{config.get('peft_type')!r}, not {method.name.upper()}")
        found = {n: {k: tensors[f"{_PREFIX}{n}.{k}"] for k in per if f"{_PREFIX}{n}.{k}" in tensors}
                 for n, per in by_site.items()}
    wrong = [f"{n}.{k}: initial {tuple(t.shape)}, adapter {tuple(by_site[n][k].shape)}" for n, per in found.items()
             for k, t in per.items() if k in by_site.get(n, {}) and tuple(t.shape) != tuple(by_site[n][k].shape)]
    if wrong:
        raise AdapterFileError(f"the initial tensors do not fit the adapter: {_few(wrong)}; they must be the same "
                               "adapter as initialised")
    return found


_TASKS = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
          "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def _task_type(gm: fx.GraphModule, copies: dict[str, FullCopy]) -> str | None:
    """PEFT's ``task_type`` for the traced class; a task that would make PEFT save modules this adapter does not
    copy (a classifier it left frozen) is written as None."""
    cls = _model_class(gm) or ""
    task = next((t for suffix, t in _TASKS.items() if cls.endswith(suffix)), None)
    if task in TASK_MODULES:
        _, owners = saved_modules(gm, list(TASK_MODULES[task]))
        if not set(owners) <= {m.owner for m in copies.values() if m.kind == "module"}:
            return None
    return task


def _config_for(gm: fx.GraphModule, method: type[Method], mods: dict[str, AdapterModule],
                sites: dict[str, Site], copies: dict[str, FullCopy]) -> dict[str, Any]:
    targeted = {n: method.target_partition(m) for n, m in mods.items()}
    universe = _module_names(gm, sites)
    target_modules = _short_keys(targeted, {n: targeted.get(n) for n in universe})
    config = {"peft_type": method.name.upper(), "base_model_name_or_path": None, "revision": None,
              "task_type": _task_type(gm, copies), "inference_mode": True, "target_modules": target_modules,
              "exclude_modules": None, "modules_to_save": None,
              **method.config_fields(mods, sites, _pattern_keys, target_modules), **copy_config_fields(copies)}
    return {k: v for k, v in config.items() if k not in method.peft_absent_fields}


def _copy_layout(items) -> set:
    return {(c.owner, c.kind, c.mode, tuple(sorted(c.bases.items())), tuple(sorted(c.keys.items()))) for c in items}


def _check_round_trip(gm: fx.GraphModule, method: type[Method], config: dict[str, Any],
                      mods: dict[str, AdapterModule], sites: dict[str, Site],
                      copies: dict[str, FullCopy]) -> dict[str, dict[str, tuple]]:
    """The written config must select exactly these sites with exactly these values, and ask for exactly these
    full copies, under PEFT's rules. Returns each site's PEFT tensor shapes."""
    try:
        fx_config = method.config_from_peft(config)
        chosen = select_sites(gm, fx_config, method, sites)
        again = {s.name: s for s in chosen}
        plans = plan_copies(gm, fx_config, next(iter(mods.values())).adapter_name, chosen, check_free=False)
    except FxPeftError as e:
        raise AdapterFileError(f"internal: the config fxpeft built does not resolve on its own graph: {e}") from e
    if set(again) != set(mods) or any(method.site_settings(fx_config, sites[n]) != method.adapter_settings(m)
                                      for n, m in mods.items()):
        raise AdapterFileError("internal: no PEFT target_modules/pattern set reproduces this adapter's sites and "
                               "values exactly; please report this graph")
    if _copy_layout(plans) != _copy_layout(copies.values()):
        raise AdapterFileError("no PEFT modules_to_save/bias setting reproduces this adapter's trained copies exactly "
                               "(PEFT matches modules_to_save names as suffixes: another module ends with the same "
                               "name?); the file would load differently")
    return {n: method.site_shapes(fx_config, sites[n]) for n in mods}


def _companion_sites(gm: fx.GraphModule, method: type[Method], fx_config: Any,
                     sites: dict[str, Site]) -> dict[str, tuple[type[Method], Any, Site]]:
    """The sites of the companions ``fx_config`` asks for (:meth:`fxpeft.Method.companions`): site -> (method, its
    config, site)."""
    out: dict[str, tuple[type[Method], Any, Site]] = {}
    for extra in method.companions(fx_config):
        companion = PeftRegistry.for_config(extra)
        for s in select_sites(gm, extra, companion, sites):
            out[s.name] = (companion, extra, s)
    return out


def _companion_round_trip(gm: fx.GraphModule, method: type[Method], config: dict[str, Any],
                          extra: dict[str, AdapterModule], sites: dict[str, Site]) -> dict[str, dict[str, tuple]]:
    """The companions the written config asks for must be exactly ``extra``, with the same settings. Returns each
    companion site's PEFT tensor shapes."""
    try:
        found = _companion_sites(gm, method, method.config_from_peft(config), sites)
    except FxPeftError as e:
        raise AdapterFileError(f"internal: the config fxpeft built does not resolve on its own graph: {e}") from e
    if set(found) != set(extra) or any(c.site_settings(cfg, s) != c.adapter_settings(extra[n])
                                       for n, (c, cfg, s) in found.items()):
        raise AdapterFileError("internal: the written config does not ask for exactly this adapter's companion "
                               "adapters; please report this graph")
    return {n: c.site_shapes(cfg, s) for n, (c, cfg, s) in found.items()}


# --------------------------------------------------------------------------------------------- load_adapter


def _read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterFileError(f"{directory!r} has no {CONFIG_NAME}; it is not a PEFT adapter directory")
    config = load_json(path)
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def _method_of(config: dict[str, Any]) -> type[Method]:
    peft_type = config.get("peft_type")
    names = [n.upper() for n in PeftRegistry.names()]
    if not isinstance(peft_type, str) or peft_type.upper() not in names:
        raise AdapterFileError(f"unsupported peft_type {peft_type!r}: fxpeft loads {names} adapters")
    return PeftRegistry.get(peft_type.lower())


def config_from_peft(peft_config: Any):
    """Convert an HF PEFT config object (``peft.LoraConfig``, ``peft.IA3Config``, ...) into fxpeft's config.

    Features fxpeft does not implement (LoftQ, EVA, CorDA inits, ...) raise :class:`AdapterFileError`.

    Example:
        >>> import peft, fxpeft
        >>> fxpeft.config_from_peft(peft.LoraConfig(r=4, target_modules=["q_proj"])).r
        4
    """
    fields = peft_config.to_dict()
    return _method_of(fields).config_from_peft(fields)


def _match_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, dict[str, tuple]], refused: dict[str, str],
                   gm: fx.GraphModule, sites: dict[str, Site]):
    """Check every key and shape; return the adapter tensors by site, and base weights saved alongside."""
    suffixes = sorted({k for per in shapes.values() for k in per} | set(refused) | {"base_layer.weight"},
                      key=len, reverse=True)
    by_site: dict[str, dict[str, torch.Tensor]] = {}
    base: dict[str, torch.Tensor] = {}
    unexpected, foreign, problems = [], [], []
    for key, t in tensors.items():
        body = key[len(_PREFIX):] if key.startswith(_PREFIX) else None
        suffix = next((s for s in suffixes if body is not None and body.endswith("." + s)), None)
        if suffix is None:  # PEFT's save_embedding_layers: a resized embedding saved whole, under its own name
            if body is not None and isinstance(_get_param(gm, body), nn.Parameter):
                base[body] = t
            else:
                unexpected.append(key)
            continue
        module = body[: -len(suffix) - 1]
        if suffix in refused:
            raise AdapterFileError(f"the adapter file holds {key!r}: {refused[suffix]}, which fxpeft does not support")
        if suffix == "base_layer.weight":
            (base.__setitem__(sites[module].weight, t) if module in sites else foreign.append(key))
        elif module not in sites:
            foreign.append(key)
        elif module not in shapes or suffix not in shapes[module]:
            unexpected.append(key)
        else:
            by_site.setdefault(module, {})[suffix] = t
            if tuple(t.shape) != shapes[module][suffix]:
                problems.append(f"{key}: file {tuple(t.shape)}, graph expects {shapes[module][suffix]}")
    if foreign:
        raise AdapterFileError(f"the adapter adapts modules this graph does not have: {_few(foreign)}. Is it the "
                               "adapter of another architecture? fxpeft.list_sites(gm) lists the graph's sites")
    missing = [f"{_PREFIX}{n}.{k}" for n, per in shapes.items() for k in per if k not in by_site.get(n, {})]
    for name, t in base.items():
        p = _get_param(gm, name)
        if tuple(t.shape) != tuple(p.shape):
            problems.append(f"base weight {name}: file {tuple(t.shape)}, graph has {tuple(p.shape)} "
                            "(was the vocabulary resized? resize the model the same way first)")
    msg = [f"{len(v)} {what}: {_few(v)}" for what, v in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                                                         ("shape mismatch(es)", problems)) if v]
    if msg:
        raise AdapterFileError("the adapter file does not fit this graph and its config: " + "; ".join(msg)
                               + ". Nothing was changed")
    return by_site, base


def _take_shared(tensors: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Take the method's shared-state tensors out of the file's (checked: every key there, every shape right)."""
    missing = [k for k in want if k not in tensors]
    wrong = [f"{k}: file {tuple(tensors[k].shape)}, expected {s}" for k, s in want.items()
             if k in tensors and tuple(tensors[k].shape) != tuple(s)]
    if missing or wrong:
        raise AdapterFileError(f"the adapter file's shared tensors do not fit: missing {_few(missing)}; "
                               f"mismatched {_few(wrong)}. Nothing was changed")
    return {k: tensors.pop(k) for k in want}


def _get_param(gm: nn.Module, name: str):
    try:
        return gm.get_parameter(name)
    except AttributeError:
        return None


def _open_adapter_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter directory's two files (nothing about the graph yet)."""
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise AdapterFileError(f"{directory!r} is a file; load_adapter takes the adapter's directory (the one holding "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    if not os.path.isdir(directory):
        raise AdapterFileError(f"adapter directory {directory!r} does not exist")
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights) and os.path.isfile(os.path.join(directory, _LEGACY_WEIGHTS)):
        raise AdapterFileError(
            f"{directory!r} holds only {_LEGACY_WEIGHTS}, a pickle; fxpeft never unpickles. Convert it once:\n"
            "    import torch, safetensors.torch as st\n"
            f"    st.save_file(torch.load('{_LEGACY_WEIGHTS}', weights_only=True), '{WEIGHTS_NAME}')")
    with read_lock(directory):  # no concurrent save renames files between the check and the reads
        config = _read_config(directory)
        if not os.path.isfile(weights):
            raise AdapterFileError(f"{directory!r} has no {WEIGHTS_NAME}")
        verify_files(directory, [CONFIG_NAME, WEIGHTS_NAME])
        return config, _read_tensors(weights)


@on_flat_graph  # an outlined graph (fxpeft.passes.OutlineBlocks) is inlined for the call
def load_adapter(gm: fx.GraphModule, directory: str | os.PathLike, adapter_name: str = "default") -> fx.GraphModule:
    """Load a PEFT-format adapter directory (written by fxpeft or by PEFT) into ``gm``.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors``, checks everything against the graph —
    the config's fields and features, the sites it targets, every tensor key, shape and value — and only then
    rewrites ``gm`` and copies the weights in. On any error ``gm`` is unchanged.

    Covered: every registered method with a file format (LoRA: linear, GPT-2 ``Conv1D``, conv, embedding,
    ``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``exclude_modules``, ``lora_bias``; IA3:
    ``feedforward_modules``; both: ``layers_to_transform``/``layers_pattern``, and ``modules_to_save``, ``task_type``
    heads and ``bias`` as trained copies, :mod:`fxpeft.copies`). Base
    weights that PEFT saved alongside (``save_embedding_layers``) are loaded into the base parameter when they
    differ from it, as PEFT does, with a warning. Features fxpeft does not implement are refused with an error
    naming them, and so is a directory with only the pickled ``adapter_model.bin``.

    Args:
        gm: a graph from :func:`fxpeft.trace` of the model the adapter was trained on.
        directory: the adapter directory.
        adapter_name: the name the adapter gets in ``gm``.

    Returns:
        ``gm``, rewritten, with the adapter's weights.

    Raises:
        AdapterFileError: the directory is missing, corrupt, uses an unsupported feature, or does not fit ``gm``.
        AdapterExistsError, UnsupportedSiteError, ConfigError: from the rewrite (still before any change).

    Example:
        >>> import torch, fxpeft, tempfile
        >>> lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> gm = fxpeft.rewrite(fxpeft.trace(lin), fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> d = tempfile.mkdtemp(); fxpeft.save_adapter(gm, d)
        >>> again = fxpeft.load_adapter(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))), d)
        >>> sorted(n for n, p in again.named_parameters() if p.requires_grad)
        ['0.lora_default.A', '0.lora_default.B']
    """
    config, tensors = _open_adapter_dir(directory)
    method = _method_of(config)
    fx_config = method.config_from_peft(config)
    if fx_config.target_modules is None and not method.targets_from_graph:
        raise AdapterFileError(f"{CONFIG_NAME} has no target_modules; fxpeft needs them to know what to adapt")
    sites = find_sites(gm, CALL_KINDS | method.site_kinds)
    try:  # fxpeft's own targeting follows PEFT's rules (list suffixes, full-match regex, "all-linear")
        chosen = select_sites(gm, fx_config, method, sites)
    except TargetError as e:
        raise AdapterFileError(f"{CONFIG_NAME} does not fit this graph (the adapter of another architecture?): {e}") from e
    shapes = {s.name: method.site_shapes(fx_config, s) for s in chosen}
    try:  # other methods' adapters the config asks for beside its own (Method.companions)
        extra = {n: c.site_shapes(cfg, s) for n, (c, cfg, s) in _companion_sites(gm, method, fx_config, sites).items()}
    except TargetError as e:
        raise AdapterFileError(f"{CONFIG_NAME} does not fit this graph: {e}") from e
    try:
        plans = plan_copies(gm, fx_config, adapter_name, chosen)  # modules_to_save, trained biases
    except TargetError as e:
        raise AdapterFileError(f"{CONFIG_NAME} does not fit this graph: {e}") from e
    shared = _take_shared(tensors, method.shared_shapes(fx_config, chosen))
    copied = take_copy_tensors(tensors, plans, method.copies_prefix)
    names = method.file_names(gm, chosen)  # where the file keeps each site's tensors (its site name by default)
    by_path, base = _match_tensors(tensors, {**{names[n]: v for n, v in shapes.items()}, **extra},
                                   method.refused_keys(), gm, {**sites, **{names[s.name]: s for s in chosen}})
    by_site = {**by_path, **{n: by_path[names[n]] for n in shapes if names[n] in by_path}}
    _warn_differences(method, chosen, "load_adapter")
    on_meta = [s.name for s in chosen if gm.get_parameter(s.weight).is_meta]
    if on_meta:  # the file's values would be copied into tensors that hold none
        raise WeightsError(f"{len(on_meta)} targeted site(s) have their base weights on the meta device (first: "
                           f"{on_meta[0]!r}); load them first: fxpeft.load_adapter(fxpeft.load_weights(gm, "
                           "checkpoint_dir), adapter_dir)")
    exact = dataclasses.replace(fx_config, target_modules=_exact_regex(shapes), exclude_modules=None,
                                layers_to_transform=None, layers_pattern=None)

    with transaction(gm) as txn:  # ---- validated: rewrite, then copy tensors whose shapes are checked ----
        rewrite_graph(gm, exact, adapter_name)
        own = {p: m for p, m in adapter_modules(gm).items() if m.adapter_name == adapter_name}
        mods = {m.site_name: m for m in site_adapters(own).values()}
        for name in shapes:
            method.load_site_tensors(mods[name], sites[name], by_site.get(name, {}))  # {}: its state is shared
        for name in extra:
            PeftRegistry.get(mods[name].method).load_site_tensors(mods[name], sites[name], by_site.get(name, {}))
        load_copy_tensors({p: m for p, m in own.items() if isinstance(m, FullCopy)}, copied)
        if shared:
            method.load_shared_tensors(getattr(gm, Method.shared_path(method.name, adapter_name)), shared)
        changed = _load_base(gm, base, txn)
    if changed:
        warnings.warn(f"load_adapter: the adapter directory carries its own base weights for {changed} (PEFT's "
                      "save_embedding_layers); they were loaded into the base parameters, as PEFT does")
    return gm


@on_flat_graph  # an outlined graph (fxpeft.passes.OutlineBlocks) is inlined for the call
def hotswap_adapter(gm: fx.GraphModule, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Replace an adapter's weights (and scaling) in place from a PEFT-format directory: no new code, and a
    compiled graph does not recompile (PEFT's ``hotswap_adapter``).

    The file must adapt exactly the adapter's sites, with the same method; a LoRA file's rank may differ, up to
    the room :func:`fxpeft.prepare_for_hotswap` made (call it before compiling). Checked before anything changes.

    Raises:
        AdapterFileError: no such adapter, other sites or method, a larger rank, or a bad file; ``gm`` is unchanged.

    Example:
        >>> import torch, fxpeft, tempfile
        >>> lin = torch.nn.Sequential(torch.nn.Linear(4, 4)); x = torch.randn(2, 4)
        >>> a = fxpeft.rewrite(fxpeft.trace(lin), fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> d = tempfile.mkdtemp(); fxpeft.save_adapter(a, d); want = a(x)
        >>> gm = fxpeft.rewrite(fxpeft.trace(lin), fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> code = gm.code; fxpeft.hotswap_adapter(gm, d)
        >>> gm.code == code, torch.allclose(gm(x), want)
        (True, True)
    """
    own = {p: m for p, m in adapter_modules(gm).items() if m.adapter_name == adapter_name}
    mods = {m.site_name: m for m in site_adapters(own).values()}
    if not mods:
        raise AdapterFileError(f"the graph holds no adapter named {adapter_name!r} (it holds "
                               f"{sorted({m.adapter_name for m in adapter_modules(gm).values()})})")
    config, tensors = _open_adapter_dir(directory)
    method = _method_of(config)
    if len(own) > len(mods) or saved_names(method.config_from_peft(config)) or config.get("bias", "none") != "none":
        raise AdapterFileError("hot-swapping adapters with modules_to_save or trained biases is not supported; "
                               "use load_adapter")
    if {m.method for m in mods.values()} != {method.name}:
        raise AdapterFileError(f"the file holds a {method.display_name} adapter; {adapter_name!r} is "
                               f"{sorted({m.method for m in mods.values()})}: a hot-swap keeps the method")
    fx_config = method.config_from_peft(config)
    sites = find_sites(gm, CALL_KINDS | method.site_kinds)
    chosen = {s.name for s in select_sites(gm, fx_config, method, sites)}
    if chosen != set(mods):
        raise AdapterFileError(f"the file adapts other sites than {adapter_name!r} (only in the file: "
                               f"{sorted(chosen - set(mods))[:3]}, only in the graph: {sorted(set(mods) - chosen)[:3]}); "
                               "a hot-swap replaces weights, not targets: use load_adapter")
    shapes = {n: method.site_shapes(fx_config, sites[n]) for n in chosen}
    shared = _take_shared(tensors, method.shared_shapes(fx_config, [sites[n] for n in chosen]))
    by_site, _ = _match_tensors(tensors, shapes, method.refused_keys(), gm, sites)
    with transaction(gm) as txn:  # every site is checked by swap_in before the next is written; roll back on error
        for name, m in mods.items():
            for t in list(m.parameters()) + list(m.buffers()):
                txn.will_write(t)
            txn.on_rollback(lambda m=m, d=dict(m.__dict__): m.__dict__.update(d))
            method.swap_in(m, sites[name], fx_config, by_site[name])
        if shared:  # the state the sites share (Method.shared_state), replaced in place at the same shapes
            state = getattr(gm, Method.shared_path(method.name, adapter_name))
            have = {k: tuple(t.shape) for k, t in method.shared_tensors(state).items()}
            if have != {k: tuple(t.shape) for k, t in shared.items()}:
                raise AdapterFileError(f"the file's shared tensors {_few(sorted(shared))} do not fit the adapter's "
                                       "(a hot-swap keeps shapes); use load_adapter")
            for t in list(state.parameters()) + list(state.buffers()):
                txn.will_write(t)
            method.load_shared_tensors(state, shared)


def prepare_for_hotswap(gm: fx.GraphModule, *, target_rank: int | None = None) -> fx.GraphModule:
    """Give every adapter room for hot-swapped files (LoRA: zero-pad to ``target_rank``), before compiling.

    Outputs do not change; the code is generated once here, so later :func:`hotswap_adapter` calls need none.
    As PEFT's ``prepare_model_for_compiled_hotswap``.
    """
    from .passes import FuseLowRankSiblings, UnfuseLowRankSiblings

    if target_rank is not None and not (isinstance(target_rank, int) and target_rank > 0):
        raise AdapterFileError(f"target_rank must be a positive integer, got {target_rank!r}")
    sites = find_sites(gm, SITE_KINDS)
    with transaction(gm):
        fused = UnfuseLowRankSiblings()(gm).modified  # fused splits bake the ranks in: re-fuse after padding
        for m in site_adapters(adapter_modules(gm)).values():
            PeftRegistry.get(m.method).prepare_swap(m, sites[m.site_name], target_rank)
        if fused:
            FuseLowRankSiblings()(gm)
        gm.recompile()
    return gm


def _load_base(gm: fx.GraphModule, base: dict[str, torch.Tensor], txn) -> list[str]:
    changed = []
    with torch.no_grad():
        for name, t in base.items():
            p = gm.get_parameter(name)
            if not torch.equal(t.to(device=p.device, dtype=p.dtype), p):
                txn.will_write(p)
                p.copy_(t)
                changed.append(name)
    return changed


# ---------------------------------------------------------------------------------------------- save_merged

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _size_bytes(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise AdapterFileError(f"max_shard_size={size!r}: use bytes (an int) or a string like '5GB', '500MB', '2GiB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise AdapterFileError(f"max_shard_size must be positive, got {size!r}")
    return value


def _full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor (a ``fully_shard`` graph's parameter) is gathered, a plain tensor is itself.

    Every rank must call it for the same DTensors in the same order (it is a collective)."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _is_dtensor(t: torch.Tensor) -> bool:
    return callable(getattr(t, "full_tensor", None))


@contextlib.contextmanager
def _gathered(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Give ``module`` plain, whole tensors in place of its DTensor parameters and buffers while in the block (a
    method's fold or file hooks then run as on one process). Yields them by name; a plain module is left alone."""
    sharded = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()] if _is_dtensor(t)}
    if not sharded:
        yield {}
        return
    whole = {n: _full(t.detach()) for n, t in sharded.items()}  # [global shape], one adapter at a time
    with _reparametrize_module(module, whole, strict=False):
        yield whole


def _storage_key(name: str, t: torch.Tensor) -> tuple:
    """Tensors with equal keys are one tensor under two names (tied weights)."""
    local = t.to_local() if _is_dtensor(t) else t
    if not local.numel():
        return (name,)
    return (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(t.shape), tuple(local.stride()),
            t.dtype, local.device)


def _merged_state(gm: fx.GraphModule, skip: Callable[[str], bool] = lambda n: False
                  ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], set[str]]:
    """The graph's state under the model's names, one entry per tensor (tied aliases dropped, as HF does), leaving
    out the names ``skip`` picks (an unmerged graph's adapters).

    Returns the state (in the graph's order), for each kept name the aliases dropped in its favour, and the names
    whose tensor must be written from its own copy (they overlap another's storage, or are not contiguous).
    """
    head = graph_info(gm).output_head or ""
    state = {n: t for n, t in gm.state_dict(keep_vars=True).items() if not skip(n)}
    position = {n: i for i, n in enumerate(state)}
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(_storage_key(name, t), []).append(name)
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, list[str]] = {}
    for names in groups.values():
        # HF drops the output head's copy of a tied weight and keeps the input embedding's.
        order = sorted(names, key=lambda n: (bool(head) and n == f"{head}.weight", position[n]))
        kept[order[0]] = state[order[0]]
        aliases[order[0]] = order[1:]
    kept = {n: kept[n] for n in state if n in kept}  # the graph's order
    seen: set[int] = set()
    own_copy: set[str] = set()
    for n, t in kept.items():  # safetensors refuses two entries over one storage: give overlaps their own copy
        local = t.to_local() if _is_dtensor(t) else t
        ptr = local.untyped_storage().data_ptr()
        if (ptr in seen and t.numel()) or not local.is_contiguous():
            own_copy.add(n)
        seen.add(ptr)
    return kept, aliases, own_copy


def _adapter_state(gm: fx.GraphModule) -> Callable[[str], bool]:
    """Picks the state-dict names that belong to adapters (their modules, their methods' shared state): what a
    merge removes from the graph."""
    mods = adapter_modules(gm)
    roots = tuple(f"{p}." for p in mods) + tuple(
        f"{Method.shared_path(m.method, m.adapter_name)}." for m in mods.values()
        if hasattr(gm, Method.shared_path(m.method, m.adapter_name)))
    return lambda name: name.startswith(roots)


def _fold_plan(gm: fx.GraphModule, state: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """For :func:`save_merged` on an unmerged graph: each base tensor that :func:`fxpeft.merge` would change, with
    a function computing its merged value (the same fp32 fold, cast back) without changing the graph.

    Raises:
        AdapterFileError: a merge that does more than fold weights in place (a tied weight it would untie, a bias
            it would add, modules_to_save copies); merge first for those.
    """
    from .lifecycle import active_adapters
    from .passes.merge import _fits, _own_readers, _readers_index

    mods = adapter_modules(gm)
    names = active_adapters(gm)  # as fxpeft.merge: the active adapters, less those merged_adapter folded already
    fold = [n for n in names if not all(m.merged for m in mods.values() if m.adapter_name == n)]
    mods = {p: m for p, m in mods.items() if m.adapter_name in fold}
    merge_first = "; call fxpeft.merge(gm) and then save_merged(gm, ...) instead (it holds the merged model once)"
    if any(isinstance(m, FullCopy) for m in mods.values()):
        raise AdapterFileError("save_merged(merge=True) does not stream adapters with modules_to_save or trained "
                               "biases" + merge_first)
    sites = find_sites(gm, SITE_KINDS)
    plan: dict[str, list[AdapterModule]] = {}
    for m in site_adapters(mods).values():
        plan.setdefault(m.site_name, []).append(m)
    readers = _readers_index(gm)
    where = {id(p): n for n, p in gm.named_parameters(remove_duplicate=False) if n in state}
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for name, group in plan.items():
        site = sites[name]
        weight = gm.get_parameter(site.weight)
        bias = gm.get_parameter(site.bias) if site.bias else None
        if any(u not in _own_readers(site) for u in readers.get(id(weight), ())):
            raise AdapterFileError(f"{name!r} shares its weight with another call site (tied weights), which a merge "
                                   "unties" + merge_first)
        memo: dict[str, torch.Tensor | None] = {}

        def folded(part: str, site=site, group=group, weight=weight, bias=bias, memo=memo) -> torch.Tensor:
            if part not in memo:  # once per site: the weight's fold gives the bias too; kept only until it is read
                with torch.no_grad(), contextlib.ExitStack() as stack:
                    for m in group:
                        stack.enter_context(_gathered(m))
                    w = _full(weight.detach()).float()
                    b = None if bias is None else _full(bias.detach()).float()
                    for m in group:  # as the merge pass: every adapter's fold in turn, in fp32
                        w, b = PeftRegistry.get(m.method).fold(m, site, w, b)
                if not (_fits(w, weight.dtype) and (b is None or _fits(b, weight.dtype))):
                    raise MergeError(f"merging {[m.adapter_name for m in group]} into {site.weight!r} gives non-finite "
                                     "values (NaN/inf); the adapter weights have diverged. Nothing was written")
                if bias is None and b is not None:
                    raise AdapterFileError(f"the merge gives {site.name!r} a bias it has not (lora_bias)" + merge_first)
                memo.update(weight=w.to(weight.dtype), bias=None if b is None else b.to(bias.dtype))
            return memo.pop(part)

        out[where[id(weight)]] = functools.partial(folded, "weight")
        if bias is not None:
            out[where[id(bias)]] = functools.partial(folded, "bias")
    return out


def _shard_plan(state: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """The names of each shard, in order: a new shard starts where the next tensor would pass ``limit``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_merged(gm: fx.GraphModule, directory: str | os.PathLike, max_shard_size: int | str = "5GB", *,
                config: Any = None, merge: bool = False) -> list[str]:
    """Write a merged graph's weights as safetensors under the original model's parameter names.

    The names are the traced model's ``state_dict`` names, so ``model.load_state_dict(...)`` takes them, and with
    a ``config.json`` beside them the HF class's ``from_pretrained(directory)`` does. Tied weights are written
    once, under the input embedding's name, as HF does. Files above ``max_shard_size`` are split into
    ``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json`` (HF's layout); one shard is
    ``model.safetensors``. Every file is written atomically; stale shards of an earlier save are removed.

    **Streaming.** Shards are built one at a time while they are written: memory beyond the model is one shard.
    With ``merge=True`` the graph may still hold its adapters: each merged weight is computed as its shard is
    written (the methods' fp32 folds, as :func:`fxpeft.merge`), so the merged model is never built and ``gm`` is
    not changed; the files are bit-identical to ``save_merged(fxpeft.merge(gm), ...)``. Under ``fully_shard``
    (DTensor parameters) call it on every rank: each tensor is gathered in turn (``full_tensor()``), and only rank
    0 holds it and writes, so no rank holds more than one shard of the whole model.

    Args:
        gm: a graph after :func:`fxpeft.merge` (no adapters left), or with ``merge=True`` one with adapters.
        directory: created if missing.
        max_shard_size: bytes, or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"`` (HF's units).
        config: the model's HF config (``model.config``), optional. If given it is written as ``config.json``
            (with ``architectures`` filled in), so ``<Class>.from_pretrained(directory)`` works; if the merge
            untied the output head from the embeddings, the written config says ``tie_word_embeddings=False``
            so transformers does not tie the merged head back to the embedding.
        merge: fold the active adapters in while writing (as :func:`fxpeft.merge` would), leaving ``gm`` as it is.
            Refused for merges that change more than weights in place (tied weights, modules_to_save, lora_bias).

    Returns:
        The weight files written, in order.

    Raises:
        AdapterFileError: the graph still holds adapters (without ``merge=True``), a merge that cannot stream, or
            ``max_shard_size`` is invalid.
        MergeError: a merged weight would be NaN/inf; nothing was written.

    Example:
        >>> import torch, fxpeft, tempfile
        >>> lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> gm = fxpeft.rewrite(fxpeft.trace(lin), fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> fxpeft.save_merged(gm, tempfile.mkdtemp(), merge=True)  # gm keeps its adapter
        ['model.safetensors']
    """
    has_adapters = bool(adapter_modules(gm))
    if has_adapters and not merge:
        left = sorted({m.adapter_name for m in adapter_modules(gm).values()})
        raise AdapterFileError(f"the graph still holds adapters {left}; call fxpeft.merge(gm) before save_merged, or "
                               "pass merge=True to fold them in while writing")
    limit = _size_bytes(max_shard_size)
    state, aliases, own_copy = _merged_state(gm, _adapter_state(gm) if has_adapters else (lambda n: False))
    folds = _fold_plan(gm, state) if has_adapters else {}
    shards = _shard_plan(state, limit)
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    sharded = any(_is_dtensor(t) for t in state.values())
    writer = not sharded or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def tensor(name: str) -> torch.Tensor:
        if name in folds:
            return folds[name]()
        t = _full(state[name].detach())
        return t.contiguous().clone() if name in own_copy else t

    if not writer:  # the other ranks take part in each gather, in rank 0's order, and drop the result
        for names in shards:
            for n in names:
                tensor(n)
        torch.distributed.barrier()  # returns when the files are in place
        return files

    def shard_writer(names: list[str]) -> Callable[[str], None]:
        return lambda tmp: save_file({n: tensor(n) for n in names}, tmp, metadata={"format": "pt"})

    plan = [(f, shard_writer(names)) for f, names in zip(files, shards)]
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {n: f for f, names in zip(files, shards) for n in sorted(names)}}
        plan.append((_INDEX, _text_writer(json.dumps(index, indent=2, sort_keys=True) + "\n")))
    config_text = _merged_config_text(gm, config, state, aliases)
    if config_text is not None:
        plan.insert(0, ("config.json", _text_writer(config_text)))
    # The shards of an earlier, differently sharded save go in the same commit as the new files.
    _commit(_prepare_dir(directory), plan, stale=lambda f: bool(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f))
            or f in ("model.safetensors", _INDEX))
    if sharded and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return files


def _merged_config_text(gm: fx.GraphModule, config: Any, state: dict[str, torch.Tensor],
                        aliases: dict[str, list[str]]) -> str | None:
    """``config.json``'s text for a merged checkpoint (``config``: an HF config, or a model for its config)."""
    hf_config = getattr(config, "config", config)
    if hf_config is None:
        return None
    hf_config = copy.deepcopy(hf_config)
    cls = _model_class(gm)
    if not getattr(hf_config, "architectures", None) and cls:
        hf_config.architectures = [cls]
    head = graph_info(gm).output_head or ""
    if getattr(hf_config, "tie_word_embeddings", False) and f"{head}.weight" in state and not aliases.get(f"{head}.weight"):
        hf_config.tie_word_embeddings = False
        warnings.warn(f"save_merged: the merge untied {head}.weight from the input embedding; config.json says "
                      "tie_word_embeddings=False so transformers keeps the merged head")
    return hf_config.to_json_string(use_diff=True)
