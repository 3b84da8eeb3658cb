"""Adapters as files, in HF PEFT's format (both ways), and merged checkpoints that transformers loads.

* :func:`save_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as PEFT's
  ``save_pretrained`` lays them out, so ``peft.PeftModel.from_pretrained`` (and anything that reads PEFT
  adapters) loads them;
* :func:`load_adapter` reads a directory written by fxpeft **or by PEFT**, checks every key, shape and config
  field against the graph *before* touching it, then rewrites the graph and loads the weights;
* :func:`save_merged` writes a merged graph's weights under the original model's parameter names, sharded by
  size with HF's ``model.safetensors.index.json``.

The PEFT layout (facts from PEFT's ``save_and_load.py`` and its tuner layers)::

    base_model.model.<site>.lora_A.weight       [r, in]          ([r, in, *kernel] for a conv)
    base_model.model.<site>.lora_B.weight       [out, r]         ([out, r, 1, ...] for a conv)
    base_model.model.<site>.lora_embedding_A    [r, num_embeddings]
    base_model.model.<site>.lora_embedding_B    [embedding_dim, r]
    base_model.model.<site>.ia3_l               [out, 1] linear; [1, in] feed-forward linear; [1, C, 1, ...] conv

Only safetensors is read or written: no load path unpickles anything. A directory holding only PEFT's legacy
``adapter_model.bin`` is refused with the two lines that convert it.

A save first writes every file to a temporary name in the target directory, then renames them over the old
ones, so a save that fails or is killed while writing leaves the previous files intact.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import fx, nn

from .errors import AdapterFileError, TargetError
from .passes.lora import _pattern_value  # PEFT's rank/alpha_pattern rule
from .registry import AdapterModule
from .sites import Site, find_sites

__all__ = ["save_adapter", "load_adapter", "save_merged", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LEGACY_WEIGHTS = "adapter_model.bin"
_INDEX = "model.safetensors.index.json"
_PREFIX = "base_model.model."

# Tensor-key suffixes, per method and site kind: (key of A or l, key of B).
_LORA_KEYS = {"linear": ("lora_A.weight", "lora_B.weight"), "conv": ("lora_A.weight", "lora_B.weight"),
              "embedding": ("lora_embedding_A", "lora_embedding_B")}
_IA3_KEY = "ia3_l"

# Keys that name a PEFT feature fxpeft does not implement: a clear error instead of "unexpected key".
_FEATURE_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora=True)",
    "lora_A.bias": "lora_bias=True", "lora_B.bias": "lora_bias=True",
    "lora_embedding_A.bias": "lora_bias=True",
    "lora_E": "AdaLoRA", "modules_to_save": "modules_to_save", "trainable_tokens_delta": "trainable_token_indices",
}

# Config fields fxpeft reads, or that do not change what the adapter computes. Any other field with a value
# that is set (not None / False / empty) names a PEFT feature fxpeft does not implement, and is refused.
_COMMON_FIELDS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                  "peft_version", "target_modules", "exclude_modules", "fan_in_fan_out", "layers_pattern"}
_LORA_FIELDS = _COMMON_FIELDS | {
    "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "init_lora_weights",
    "bias", "megatron_core", "qalora_group_size", "loftq_config", "ensure_weight_tying",
    # initialisation recipes: only how the weights started, which the file overrides
    "eva_config", "corda_config", "lora_ga_config", "runtime_config"}
_IA3_FIELDS = _COMMON_FIELDS | {"feedforward_modules", "init_ia3_weights"}
# init_lora_weights values that rewrite the *base* weights at initialisation (the adapter only makes sense
# on top of the residual base model they produce).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


# ------------------------------------------------------------------------------------------------ atomic IO


def _commit(directory: str, files: list[tuple[str, Callable[[str], None]]]) -> None:
    """Write every ``(name, write)`` to a temporary file in ``directory``, then rename them all into place.

    A failure (or a kill) while writing leaves every previous file as it was; only the renames, which are
    atomic each, touch the real names. The last file is renamed last (an index or config goes there).
    """
    done: list[tuple[str, str]] = []
    try:
        for name, write in files:
            fd, tmp = tempfile.mkstemp(prefix=".fxpeft-tmp-", suffix="-" + name, dir=directory)
            os.close(fd)
            done.append((tmp, os.path.join(directory, name)))
            write(tmp)
    except BaseException:
        for tmp, _ in done:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for tmp, final in done:
        os.replace(tmp, final)


def _text_writer(text: str) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return write


def _tensor_writer(tensors: dict[str, torch.Tensor]) -> Callable[[str], None]:
    return lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)  # safetensors: a JSON header and raw bytes, never pickle
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or corrupt. "
            "Re-save or re-download it.") from e


def _prepare_dir(directory: str | os.PathLike) -> str:
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise AdapterFileError(f"{directory!r} exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    return directory


# ----------------------------------------------------------------------------------- PEFT's matching rules


def _target_match(spec: list[str] | str, name: str) -> bool:
    """PEFT's ``target_modules`` / ``exclude_modules`` rule (the one ``rewrite`` uses)."""
    from .passes.inject import _matches

    return _matches(spec, name)


def _ff_match(spec: list[str] | str | None, name: str) -> bool:
    """PEFT's IA3 ``feedforward_modules`` rule (the one the IA3 pass uses)."""
    from .passes.ia3 import IA3Config, is_feedforward

    return is_feedforward(IA3Config(feedforward_modules=spec), name)


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


# ------------------------------------------------------------------------------------------ the site plan


@dataclass
class _Plan:
    """What one site of an adapter file holds: method, hyper-parameters and PEFT-layout tensor shapes."""

    site: Site
    method: str
    r: int = 0
    alpha: float = 0.0
    feedforward: bool = False
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key suffix -> PEFT shape


def _lora_shapes(site: Site, r: int) -> dict[str, tuple[int, ...]]:
    a, b = _LORA_KEYS[site.kind]
    if site.kind == "conv":
        ones = (1,) * len(site.kernel_size)
        return {a: (r, site.in_features, *site.kernel_size), b: (site.out_features, r, *ones)}
    return {a: (r, site.in_features), b: (site.out_features, r)}  # embedding: (r, num), (dim, r)


def _ia3_shape(site: Site, feedforward: bool) -> tuple[int, ...]:
    n = site.in_features if feedforward else site.out_features
    if site.kind == "conv":
        return (1, n, *(1,) * len(site.kernel_size))
    return (1, n) if feedforward else (n, 1)


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


def _warn_dilated(plans: dict[str, _Plan], direction: str) -> None:
    """Warn about sites whose adapter PEFT would apply differently (or not at all) from the same file."""
    def outside_owner(site: Site) -> bool:  # the weight is also read by code outside its module's own call
        for call in site.calls:
            stack = call.node.meta.get("nn_module_stack")
            if call.node.op == "call_module" or not stack:
                continue
            if list(stack.values())[-1][0] != site.name:
                return True
        return any(c.node.op == "call_module" for c in site.calls) and any(c.node.op != "call_module" for c in site.calls)

    checks = [
        (lambda p: p.method == "lora" and p.site.kind == "conv" and any(d != 1 for d in (p.site.dilation or ())),
         "conv LoRA on dilated convolution(s): PEFT's lora_A conv ignores the base dilation (it uses 1), fxpeft's uses it"),
        (lambda p: not p.site.weight.endswith(".weight") or p.site.name == p.site.weight,
         "site(s) that are bare parameters (e.g. nn.MultiheadAttention.in_proj_weight): PEFT's module-based "
         "LoRA/IA3 cannot hold them and skips them or refuses the file"),
        (lambda p: p.site.weight.endswith(".weight") and p.site.name != p.site.weight and outside_owner(p.site),
         "site(s) whose weight is also applied outside its module's own forward (fxpeft adapts every call, "
         "PEFT only the module call)"),
    ]
    for test, why in checks:
        hit = [p.site.name for p in plans.values() if test(p)]
        if hit:
            warnings.warn(f"{direction}: {why}: {hit[:3]}; the same file gives different outputs in PEFT "
                          "(fxpeft's own save/load round trip is exact)")


# --------------------------------------------------------------------------------------------- save_adapter


def save_adapter(gm: fx.GraphModule, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write one adapter of ``gm`` as ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's layout.

    ``peft.PeftModel.from_pretrained(model, directory)`` loads the result on the original model class.
    ``target_modules`` is written as the shortest module-name suffixes that select exactly the adapted sites;
    per-site ranks and alphas become ``rank_pattern`` / ``alpha_pattern``. Each file is written atomically.

    Args:
        gm: a rewritten graph.
        directory: created if missing; existing adapter files in it are replaced.
        adapter_name: which adapter of ``gm`` to write (the file itself holds no adapter name, as in PEFT).

    Raises:
        AdapterFileError: ``gm`` has no such adapter, or it cannot be expressed as one PEFT config.

    Example:
        >>> import torch, fxpeft, tempfile, os
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
        >>> d = tempfile.mkdtemp(); fxpeft.save_adapter(gm, d)
        >>> sorted(os.listdir(d))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    mods = {m.site_name: m for m in gm.modules() if isinstance(m, AdapterModule) and m.adapter_name == adapter_name}
    if not mods:
        have = sorted({m.adapter_name for m in gm.modules() if isinstance(m, AdapterModule)})
        raise AdapterFileError(f"the graph holds no adapter named {adapter_name!r} (it holds {have}); "
                               "pass adapter_name=, or rewrite the graph first")
    methods = {m.method for m in mods.values()}
    if len(methods) > 1:
        raise AdapterFileError(f"adapter {adapter_name!r} mixes methods {sorted(methods)}; one PEFT adapter file holds "
                               "one method. Give each method its own adapter name")
    method = methods.pop()
    if method not in ("lora", "ia3"):
        raise AdapterFileError(f"method {method!r} has no PEFT file format in fxpeft; only LoRA and IA3 are saved")
    sites = find_sites(gm)
    lost = [s for s in mods if s not in sites]
    if lost:
        raise AdapterFileError(f"adapter sites {lost[:3]} are no longer call sites of this graph; was it edited by hand?")
    universe = _module_names(gm, sites)
    if method == "lora":
        config, tensors, plans = _lora_export(gm, mods, sites, universe)
    else:
        config, tensors, plans = _ia3_export(gm, mods, sites, universe)
    _warn_dilated(plans, "save_adapter")
    _check_round_trip(config, plans, sites, gm)

    _commit(_prepare_dir(directory), [(WEIGHTS_NAME, _tensor_writer(tensors)),
                                      (CONFIG_NAME, _text_writer(json.dumps(config, indent=2, sort_keys=True) + "\n"))])


def _model_class(gm: fx.GraphModule) -> str | None:
    """The traced model's class name (recorded by :func:`fxpeft.trace`; else read off the graph's class)."""
    cls = getattr(gm, "meta", {}).get("fxpeft_model_class")
    name = type(gm).__name__
    return cls or (name.removesuffix("Graph") if name.endswith("Graph") else None)


def _task_type(gm: fx.GraphModule) -> str | None:
    cls = _model_class(gm) or ""
    return "CAUSAL_LM" if cls.endswith(("ForCausalLM", "LMHeadModel")) else None


def _base_config(gm: fx.GraphModule, plans: dict[str, _Plan], universe: set[str],
                 targeted: dict[str, Any]) -> dict[str, Any]:
    everything = {n: targeted.get(n, None) for n in universe}
    return {
        "base_model_name_or_path": None,
        "revision": None,
        "task_type": _task_type(gm),
        "inference_mode": True,
        "target_modules": _short_keys(targeted, everything),
        "exclude_modules": None,
        "fan_in_fan_out": any(p.site.module_type == "Conv1D" for p in plans.values()),
        "modules_to_save": None,
    }


def _tensor(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return t.detach().to("cpu").reshape(shape).contiguous().clone()


def _lora_export(gm, mods, sites, universe):
    plans: dict[str, _Plan] = {}
    tensors: dict[str, torch.Tensor] = {}
    rslora = {m.use_rslora for m in mods.values()}
    if len(rslora) > 1:
        raise AdapterFileError("the adapter's sites disagree on use_rslora; one PEFT config has one use_rslora")
    for name, m in mods.items():
        site = sites[name]
        plans[name] = p = _Plan(site, "lora", r=int(m.r), alpha=m.lora_alpha, tensors=_lora_shapes(site, int(m.r)))
        (ka, sa), (kb, sb) = p.tensors.items()
        tensors[f"{_PREFIX}{name}.{ka}"] = _tensor(m.A, sa)
        tensors[f"{_PREFIX}{name}.{kb}"] = _tensor(m.B, sb)
    r = Counter(p.r for p in plans.values()).most_common(1)[0][0]
    alpha = Counter(p.alpha for p in plans.values()).most_common(1)[0][0]
    dropouts = [getattr(getattr(m, "dropout", None), "p", 0.0) for m in mods.values()]
    config = {"peft_type": "LORA", **_base_config(gm, plans, universe, {n: True for n in plans}),
              "r": r, "lora_alpha": alpha, "lora_dropout": Counter(dropouts).most_common(1)[0][0],
              "use_rslora": rslora.pop(), "init_lora_weights": True, "bias": "none", "use_dora": False,
              "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
              "rank_pattern": _pattern_keys({n: p.r for n, p in plans.items()}, r),
              "alpha_pattern": _pattern_keys({n: p.alpha for n, p in plans.items()}, alpha)}
    return config, tensors, plans


def _pattern_keys(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """``rank_pattern``-style keys for the sites whose value is not ``default`` (escaped dotted suffixes)."""
    odd = {n: v for n, v in values.items() if v != default}
    keys = _short_keys(odd, values)
    return {re.escape(k): next(v for n, v in odd.items() if _target_match([k], n)) for k in keys}


def _ia3_export(gm, mods, sites, universe):
    plans: dict[str, _Plan] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in mods.items():
        site = sites[name]
        shape = _ia3_shape(site, m.is_feedforward)
        plans[name] = _Plan(site, "ia3", feedforward=bool(m.is_feedforward), tensors={_IA3_KEY: shape})
        tensors[f"{_PREFIX}{name}.{_IA3_KEY}"] = _tensor(m.l, shape)
    # Each target key covers sites of one kind (feed-forward or not), so the feed-forward keys are a subset
    # of target_modules (PEFT requires it).
    config = {"peft_type": "IA3", **_base_config(gm, plans, universe, {n: p.feedforward for n, p in plans.items()}),
              "init_ia3_weights": True}
    config["feedforward_modules"] = [k for k in config["target_modules"]
                                     if any(p.feedforward for n, p in plans.items() if _target_match([k], n))]
    return config, tensors, plans


def _check_round_trip(config: dict, plans: dict[str, _Plan], sites: dict[str, Site], gm: fx.GraphModule) -> None:
    """The written config must select exactly these sites with exactly these values under PEFT's rules."""
    try:
        again = _resolve(config, sites, gm)
    except AdapterFileError as e:
        raise AdapterFileError(f"internal: the config fxpeft built does not resolve on its own graph: {e}") from e
    if set(again) != set(plans) or any((again[n].r, again[n].alpha, again[n].feedforward)
                                       != (p.r, p.alpha, p.feedforward) for n, p in plans.items()):
        raise AdapterFileError("internal: no PEFT target_modules/pattern set reproduces this adapter's sites and "
                               "values exactly; please report this graph")


# --------------------------------------------------------------------------------------------- load_adapter


def _read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterFileError(f"{directory!r} has no {CONFIG_NAME}; it is not a PEFT adapter directory")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path} is not valid JSON ({e}); it is truncated or corrupt") from e
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def _check_features(config: dict[str, Any]) -> str:
    """Return the method name; refuse any config field whose feature fxpeft does not implement."""
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() not in ("LORA", "IA3"):
        raise AdapterFileError(f"unsupported peft_type {peft_type!r}: fxpeft loads LORA and IA3 adapters only")
    method = peft_type.lower()
    known = _LORA_FIELDS if method == "lora" else _IA3_FIELDS
    set_fields = {k: v for k, v in config.items() if k not in known and v not in (None, False, {}, [], "")}
    named = {"use_dora": "DoRA (use_dora=True)", "lora_bias": "lora_bias=True", "modules_to_save": "modules_to_save",
             "layers_to_transform": "layers_to_transform", "trainable_token_indices": "trainable_token_indices",
             "target_parameters": "target_parameters (LoRA on nn.Parameter)", "layer_replication": "layer_replication"}
    if set_fields:
        k, v = next(iter(set_fields.items()))
        raise AdapterFileError(f"the adapter uses {named.get(k, f'{k}={v!r}')}, which fxpeft does not support"
                               + (f" (also set: {sorted(set_fields)[1:]})" if len(set_fields) > 1 else ""))
    if method == "lora":
        if config.get("bias", "none") != "none":
            raise AdapterFileError(f"the adapter trains biases (bias={config['bias']!r}), which fxpeft does not support")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise AdapterFileError(
                f"the adapter was initialised with init_lora_weights={init!r}, which rewrites the base weights; "
                "fxpeft loads adapters on the original base only. Convert it to plain LoRA with PEFT first "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")

        def rank(v):
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for k, ok, what in (("rank_pattern", rank, "a positive integer"), ("alpha_pattern", number, "a number")):
            pattern = config.get(k) or {}
            if not isinstance(pattern, dict):
                raise AdapterFileError(f"{CONFIG_NAME}: {k} must be an object, got {pattern!r}")
            bad = {p: v for p, v in pattern.items() if not ok(v)}
            if bad:
                raise AdapterFileError(f"{CONFIG_NAME}: {k} values must each be {what}, got {bad}")
        if not rank(config.get("r", 8)):
            raise AdapterFileError(f"{CONFIG_NAME}: r={config.get('r')!r}; it must be a positive integer")
        if not number(config.get("lora_alpha", 8)):
            raise AdapterFileError(f"{CONFIG_NAME}: lora_alpha={config.get('lora_alpha')!r} is not a number")
    return method


def config_from_peft(peft_config: Any):
    """Convert an HF ``peft.LoraConfig`` / ``peft.IA3Config`` into fxpeft's config of the same fields.

    Features fxpeft does not implement (DoRA, ``modules_to_save``, ...) raise :class:`AdapterFileError`.

    Example:
        >>> import peft, fxpeft
        >>> fxpeft.config_from_peft(peft.LoraConfig(r=4, target_modules=["q_proj"])).r
        4
    """
    import dataclasses

    from .passes.ia3 import IA3Config
    from .passes.lora import LoraConfig

    d = peft_config.to_dict()
    cls = LoraConfig if _check_features(d) == "lora" else IA3Config
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in d.items() if k in names})


def _resolve(config: dict[str, Any], sites: dict[str, Site], gm: fx.GraphModule) -> dict[str, _Plan]:
    """Which sites the config adapts, with what, under PEFT's rules; raises when it targets what the graph lacks."""
    from .passes.inject import select_sites

    method = config["peft_type"].lower()
    targets = config.get("target_modules")
    if targets is None:
        raise AdapterFileError(f"{CONFIG_NAME} has no target_modules; fxpeft needs them to know what to adapt")
    try:  # fxpeft's own targeting follows PEFT's rules (list suffixes, full-match regex, "all-linear")
        chosen = select_sites(gm, SimpleNamespace(target_modules=targets, exclude_modules=config.get("exclude_modules")),
                              method, sites)
    except TargetError as e:
        raise AdapterFileError(f"{CONFIG_NAME} does not fit this graph (the adapter of another architecture?): {e}") from e
    plans = {}
    for s in chosen:
        if method == "lora":
            r = _pattern_value(config.get("rank_pattern") or {}, s.name, config.get("r", 8))
            alpha = _pattern_value(config.get("alpha_pattern") or {}, s.name, config.get("lora_alpha", 8))
            plans[s.name] = _Plan(s, "lora", r=r, alpha=alpha, tensors=_lora_shapes(s, r))
        else:
            ff = _ff_match(config.get("feedforward_modules"), s.name)
            plans[s.name] = _Plan(s, "ia3", feedforward=ff, tensors={_IA3_KEY: _ia3_shape(s, ff)})
    return plans


def _split_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.<module>.<suffix>`` -> (module, suffix) for the adapter and base-layer suffixes."""
    if not key.startswith(_PREFIX):
        return None
    body = key[len(_PREFIX):]
    for suffix in ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", _IA3_KEY,
                   "base_layer.weight", *_FEATURE_KEYS):
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], suffix
    return None


def _few(items: list, n: int = 5) -> str:
    return ", ".join(map(str, items[:n])) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _match_tensors(tensors: dict[str, torch.Tensor], plans: dict[str, _Plan], sites: dict[str, Site],
                   gm: fx.GraphModule) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Check every key and shape; return the adapter tensors by site, and base weights saved alongside."""
    by_site: dict[str, dict[str, torch.Tensor]] = {}
    base: dict[str, torch.Tensor] = {}
    unexpected, foreign, problems = [], [], []
    for key, t in tensors.items():
        split = _split_key(key)
        if split is None:
            # PEFT's save_embedding_layers: a resized embedding saved whole, under its own name.
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else None
            if name is not None and isinstance(_get_param(gm, name), nn.Parameter):
                base[name] = t
            else:
                unexpected.append(key)
            continue
        module, suffix = split
        if suffix in _FEATURE_KEYS:
            raise AdapterFileError(f"the adapter file holds {key!r}: {_FEATURE_KEYS[suffix]}, which fxpeft does not support")
        if suffix == "base_layer.weight":
            if module in sites:
                base[sites[module].weight] = t
            else:
                foreign.append(key)
            continue
        if module not in sites:
            foreign.append(key)
        elif module not in plans:
            unexpected.append(key)
        else:
            by_site.setdefault(module, {})[suffix] = t
    if foreign:
        raise AdapterFileError(f"the adapter adapts modules this graph does not have: {_few(foreign)}. Is it the "
                               "adapter of another architecture? fxpeft.list_sites(gm) lists the graph's sites")
    missing = [f"{_PREFIX}{n}.{k}" for n, p in plans.items() for k in p.tensors if k not in by_site.get(n, {})]
    extra = [f"{_PREFIX}{n}.{k}" for n, ts in by_site.items() for k in ts if k not in plans[n].tensors]
    unexpected += extra
    for n, ts in by_site.items():
        for k, t in ts.items():
            want = plans[n].tensors.get(k)
            if want is not None and tuple(t.shape) != want:
                problems.append(f"{_PREFIX}{n}.{k}: file {tuple(t.shape)}, graph expects {want}")
    for name, t in base.items():
        p = _get_param(gm, name)
        if tuple(t.shape) != tuple(p.shape):
            problems.append(f"base weight {name}: file {tuple(t.shape)}, graph has {tuple(p.shape)} "
                            "(was the vocabulary resized? resize the model the same way first)")
    msg = []
    if missing:
        msg.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        msg.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if problems:
        msg.append(f"{len(problems)} shape mismatch(es): {_few(problems)}")
    if msg:
        raise AdapterFileError("the adapter file does not fit this graph and its config: " + "; ".join(msg)
                               + ". Nothing was changed")
    return by_site, base


def _get_param(gm: nn.Module, name: str):
    try:
        return gm.get_parameter(name)
    except AttributeError:
        return None


def load_adapter(gm: fx.GraphModule, directory: str | os.PathLike, adapter_name: str = "default") -> fx.GraphModule:
    """Load a PEFT-format adapter directory (written by fxpeft or by PEFT) into ``gm``.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors``, checks everything against the graph —
    the config's features, the sites it targets, every tensor key and shape — and only then rewrites ``gm``
    (with :func:`fxpeft.rewrite`) and copies the weights in. On any error ``gm`` is unchanged.

    Covered: LoRA (linear, GPT-2 ``Conv1D`` via ``fan_in_fan_out``, conv, embedding; ``use_rslora``,
    ``rank_pattern``, ``alpha_pattern``, ``exclude_modules``) and IA3 (``feedforward_modules``). Base weights that
    PEFT saved alongside (``save_embedding_layers``) are loaded into the base parameter when they differ from it,
    as PEFT does, with a warning. Refused with an error naming the feature: another ``peft_type``, DoRA,
    ``lora_bias``, trained biases, ``modules_to_save``, ``layers_to_transform``, trainable tokens, base-changing
    initialisations (PiSSA, OLoRA, CorDA, LoftQ), and a directory with only the pickled ``adapter_model.bin``.

    Args:
        gm: a graph from :func:`fxpeft.trace` of the model the adapter was trained on.
        directory: the adapter directory.
        adapter_name: the name the adapter gets in ``gm``.

    Returns:
        ``gm``, rewritten, with the adapter's weights.

    Raises:
        AdapterFileError: the directory is missing, corrupt, uses an unsupported feature, or does not fit ``gm``.
        AdapterExistsError, UnsupportedSiteError: from the rewrite (still before any change).

    Example:
        >>> import torch, fxpeft, tempfile
        >>> lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> gm = fxpeft.rewrite(fxpeft.trace(lin), fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> d = tempfile.mkdtemp(); fxpeft.save_adapter(gm, d)
        >>> again = fxpeft.load_adapter(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))), d)
        >>> sorted(n for n, p in again.named_parameters() if p.requires_grad)
        ['0.lora_default.A', '0.lora_default.B']
    """
    from .api import rewrite
    from .passes.ia3 import IA3Config
    from .passes.lora import LoraConfig

    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise AdapterFileError(f"{directory!r} is a file; load_adapter takes the adapter's directory (the one holding "
                               "adapter_config.json and adapter_model.safetensors)")
    if not os.path.isdir(directory):
        raise AdapterFileError(f"adapter directory {directory!r} does not exist")
    config = _read_config(directory)
    method = _check_features(config)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(directory, _LEGACY_WEIGHTS)):
            raise AdapterFileError(
                f"{directory!r} holds only {_LEGACY_WEIGHTS}, a pickle; fxpeft never unpickles. Convert it once:\n"
                "    import torch, safetensors.torch as st\n"
                f"    st.save_file(torch.load('{_LEGACY_WEIGHTS}', weights_only=True), '{WEIGHTS_NAME}')")
        raise AdapterFileError(f"{directory!r} has no {WEIGHTS_NAME}")
    tensors = _read_tensors(weights)

    sites = find_sites(gm)
    plans = _resolve(config, sites, gm)
    by_site, base = _match_tensors(tensors, plans, sites, gm)
    _warn_dilated(plans, "load_adapter")

    if method == "lora":
        # fxpeft's rank/alpha patterns follow PEFT's rule, so they pass through; the sites are named exactly.
        fx_config = LoraConfig(
            r=config.get("r", 8), lora_alpha=config.get("lora_alpha", 8),
            lora_dropout=float(config.get("lora_dropout") or 0.0), target_modules=_exact_regex(plans),
            use_rslora=bool(config.get("use_rslora", False)), init_lora_weights=True,
            rank_pattern=dict(config.get("rank_pattern") or {}), alpha_pattern=dict(config.get("alpha_pattern") or {}),
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)))
    else:
        ff = [n for n, p in plans.items() if p.feedforward]
        fx_config = IA3Config(target_modules=_exact_regex(plans), feedforward_modules=_exact_regex(ff) if ff else None,
                              fan_in_fan_out=bool(config.get("fan_in_fan_out", False)))

    # ---- validated: rewrite (atomic itself), then copy weights whose shapes are already checked ----
    rewrite(gm, fx_config, adapter_name)
    mods = {m.site_name: m for m in gm.modules() if isinstance(m, AdapterModule) and m.adapter_name == adapter_name}
    with torch.no_grad():
        for name, plan in plans.items():
            m, ts = mods[name], by_site[name]
            if method == "lora":
                a, b = _LORA_KEYS[plan.site.kind]
                m.A.copy_(ts[a].reshape(m.A.shape))
                m.B.copy_(ts[b].reshape(m.B.shape))
            else:
                m.l.copy_(ts[_IA3_KEY].reshape(m.l.shape))
        changed = []
        for name, t in base.items():
            p = gm.get_parameter(name)
            if not torch.equal(t.to(device=p.device, dtype=p.dtype), p):
                p.copy_(t)
                changed.append(name)
    if changed:
        warnings.warn(f"load_adapter: the adapter directory carries its own base weights for {changed} (PEFT's "
                      "save_embedding_layers); they were loaded into the base parameters, as PEFT does")
    return gm


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


def _merged_state(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The graph's state under the model's names, one entry per tensor (tied aliases dropped, as HF does).

    Returns the state and, for each kept name, the aliases dropped in its favour.
    """
    head = getattr(gm, "meta", {}).get("fxpeft_output_head") or ""
    state = gm.state_dict()
    position = {n: i for i, n in enumerate(state)}
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
               t.device) if t.numel() else (name,)
        groups.setdefault(key, []).append(name)
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, list[str]] = {}
    for names in groups.values():
        # HF drops the output head's copy of a tied weight and keeps the input embedding's.
        order = sorted(names, key=lambda n: (bool(head) and n == f"{head}.weight", position[n]))
        kept[order[0]] = state[order[0]]
        aliases[order[0]] = order[1:]
    kept = {n: kept[n] for n in state if n in kept}  # the graph's order
    seen: set[int] = set()
    for n, t in kept.items():  # safetensors refuses two entries over one storage: give overlaps their own copy
        ptr = t.untyped_storage().data_ptr()
        if (ptr in seen and t.numel()) or not t.is_contiguous():
            kept[n] = t.contiguous().clone()
        seen.add(ptr)
    return kept, aliases


def save_merged(merged_gm: fx.GraphModule, directory: str | os.PathLike, max_shard_size: int | str = "5GB", *,
                config: Any = None) -> list[str]:
    """Write a merged graph's weights as safetensors under the original model's parameter names.

    The names are the traced model's ``state_dict`` names, so ``model.load_state_dict(...)`` takes them, and with
    a ``config.json`` beside them the HF class's ``from_pretrained(directory)`` does. Tied weights are written
    once, under the input embedding's name, as HF does. Files above ``max_shard_size`` are split into
    ``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json`` (HF's layout); one shard is
    ``model.safetensors``. Every file is written atomically; stale shards of an earlier save are removed.

    Args:
        merged_gm: a graph after :func:`fxpeft.merge` (no adapters left).
        directory: created if missing.
        max_shard_size: bytes, or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"`` (HF's units).
        config: the model's HF config (``model.config``), optional. If given it is written as ``config.json``
            (with ``architectures`` filled in), so ``<Class>.from_pretrained(directory)`` works; if the merge
            untied the output head from the embeddings, the written config says ``tie_word_embeddings=False``
            so transformers does not tie the merged head back to the embedding.

    Returns:
        The weight files written, in order.

    Raises:
        AdapterFileError: the graph still holds adapters, or ``max_shard_size`` is invalid.

    Example:
        >>> import torch, fxpeft, tempfile
        >>> lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> gm = fxpeft.merge(fxpeft.rewrite(fxpeft.trace(lin), fxpeft.LoraConfig(r=2, target_modules=["0"])))
        >>> fxpeft.save_merged(gm, tempfile.mkdtemp())
        ['model.safetensors']
    """
    left = sorted({m.adapter_name for m in merged_gm.modules() if isinstance(m, AdapterModule)})
    if left:
        raise AdapterFileError(f"the graph still holds adapters {left}; call fxpeft.merge(gm) before save_merged")
    limit = _size_bytes(max_shard_size)
    state, aliases = _merged_state(merged_gm)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    hf_config = getattr(config, "config", config)  # a model is accepted for its config
    config_text = None
    if hf_config is not None:
        hf_config = copy.deepcopy(hf_config)
        cls = _model_class(merged_gm)
        if not getattr(hf_config, "architectures", None) and cls:
            hf_config.architectures = [cls]
        head = getattr(merged_gm, "meta", {}).get("fxpeft_output_head") or ""
        if getattr(hf_config, "tie_word_embeddings", False) and f"{head}.weight" in state and not aliases.get(f"{head}.weight"):
            hf_config.tie_word_embeddings = False
            warnings.warn(f"save_merged: the merge untied {head}.weight from the input embedding; config.json says "
                          "tie_word_embeddings=False so transformers keeps the merged head")
        config_text = hf_config.to_json_string(use_diff=True)

    plan = [(f, _tensor_writer(shard)) for f, shard in zip(files, shards)]
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {n: f for f, shard in zip(files, shards) for n in sorted(shard)}}
        plan.append((_INDEX, _text_writer(json.dumps(index, indent=2, sort_keys=True) + "\n")))
    if config_text is not None:
        plan.insert(0, ("config.json", _text_writer(config_text)))
    directory = _prepare_dir(directory)
    _commit(directory, plan)
    # Drop the shards of an earlier, differently sharded save (after the new files are in place).
    keep = set(files) | ({_INDEX} if len(files) > 1 else set())
    for fname in os.listdir(directory):
        stale = re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", fname) or fname in ("model.safetensors", _INDEX)
        if stale and fname not in keep:
            os.unlink(os.path.join(directory, fname))
    return files
