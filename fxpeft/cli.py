"""The ``fxpeft`` command line: ``inspect`` a model's sites, ``draw`` its graph, run the ``demo``.

``MODEL`` is either

* a Python factory ``pkg.module:fn`` (or ``pkg.module:fn(layers=16)`` with literal arguments) returning a
  model, or a model with example inputs (an :class:`fxpeft.zoo.Example` or a ``(model, args, kwargs)``
  tuple). With inputs the model is captured with ``torch.export``, without with ``torch.fx.symbolic_trace``.
  fxpeft imports ``pkg.module`` and runs ``fn``: that executes the module's Python code, so name only code
  you trust;
* a local Hugging Face model directory (or its ``config.json``): the model is built from the config, and
  loaded with its weights when the directory has them; it is captured with example ``input_ids``.

Examples::

    fxpeft inspect fxpeft.zoo:tiny_llama
    fxpeft draw fxpeft.zoo:tiny_llama --out llama.svg --lora r=8,target=q_proj,v_proj
    fxpeft draw fxpeft.zoo:cnn --out cnn.png --lora target=conv1,conv2 --merge --diff

``draw`` has one ``--<name> SPEC`` option per method in :class:`fxpeft.PeftRegistry` (see
:func:`parse_adapter_spec`). Every error is one line on stderr, ``fxpeft COMMAND: error: ...``, with exit
status 2 for a command-line mistake and 1 otherwise; ``--debug`` prints the traceback too.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import json
import os
import math
import sys
import time
import traceback
import types
import typing
from pathlib import Path
from typing import Any

from .errors import FxPeftError

__all__ = ["main", "build_parser", "load_model", "parse_adapter_spec"]


class CliError(FxPeftError):
    """A command-line mistake (a MODEL that cannot be found, a malformed ``--<method>`` SPEC); exit status 2.
    The message names the fix."""


class CommandError(FxPeftError):
    """The command could not do its job for a reason outside fxpeft (the user's factory raised, ``--out``
    cannot be written); exit status 1."""


# --------------------------------------------------------------------------------------------------------
# MODEL
# --------------------------------------------------------------------------------------------------------

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _literal_call(spec: str, expr: str) -> tuple[str, tuple, dict]:
    """``fn`` or ``fn(1, layers=16)`` -> (dotted name, args, kwargs); only literals are allowed as arguments."""
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        raise CliError(f"MODEL {spec!r}: {expr!r} is not a function name or a call like fn(layers=16)") from None
    call = tree if isinstance(tree, ast.Call) else None
    target = call.func if call is not None else tree
    parts = []
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if not isinstance(target, ast.Name):
        raise CliError(f"MODEL {spec!r}: {expr!r} is not a function name or a call like fn(layers=16)")
    parts.append(target.id)
    try:
        args = tuple(ast.literal_eval(a) for a in call.args) if call else ()
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords} if call else {}
    except ValueError:
        raise CliError(f"MODEL {spec!r}: factory arguments must be Python literals (numbers, strings, ...)") from None
    if None in kwargs:
        raise CliError(f"MODEL {spec!r}: **kwargs are not supported in a factory call")
    return ".".join(reversed(parts)), args, kwargs


def _from_factory(spec: str):
    module_name, _, expr = spec.partition(":")
    name, args, kwargs = _literal_call(spec, expr)
    # Importing the module runs its code (that is what a factory MODEL is): anything it raises is reported.
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise CliError(f"MODEL {spec!r}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?") from None
    except Exception as e:
        raise CommandError(f"MODEL {spec!r}: importing {module_name!r} raised {_describe(e)}") from e
    for part in name.split("."):
        if not hasattr(obj, part):
            raise CliError(f"MODEL {spec!r}: module {module_name!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    from torch import nn

    if not callable(obj) or isinstance(obj, nn.Module):  # a model object, or a (model, args, kwargs) tuple
        if args or kwargs:
            raise CliError(f"MODEL {spec!r}: {name!r} is not a function; drop the arguments")
        return obj
    try:
        inspect.signature(obj).bind(*args, **kwargs)
    except TypeError as e:  # the arguments do not fit: the command line's mistake
        raise CliError(f"MODEL {spec!r}: cannot call {name}(...) with these arguments: {e}") from None
    except ValueError:  # no signature to check (a builtin): let the call say
        pass
    try:
        return obj(*args, **kwargs)
    except Exception as e:  # the user's factory failed: its error, in one line (--debug shows the traceback)
        raise CommandError(f"MODEL {spec!r}: {name}(...) raised {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    """``ValueError: the first line of the message``."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _hf_inputs(model, config) -> tuple[tuple, dict]:
    import torch

    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {}
    if "input_ids" in params and getattr(config, "vocab_size", None):
        torch.manual_seed(0)
        # Batch 2, not 1: torch.export specialises a size-1 dim, and the graph should keep batch dynamic.
        kwargs["input_ids"] = torch.randint(0, min(int(config.vocab_size), 1000), (2, 16))
    elif "pixel_values" in params:
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        kwargs["pixel_values"] = torch.randn(2, getattr(config, "num_channels", 3), size, size)
    else:
        raise CliError(f"cannot make example inputs for {type(model).__name__} (no input_ids or pixel_values); "
                       "wrap it in a factory pkg.module:fn that returns (model, args, kwargs)")
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return (), kwargs


def _from_hf_dir(spec: str, path: Path):
    directory = path.parent if path.is_file() else path
    if not (directory / "config.json").is_file():
        raise CliError(f"MODEL {spec!r}: {directory} has no config.json; a Hugging Face model directory needs one")
    try:
        import torch
        import transformers
    except ImportError:
        raise CliError("building a model from a Hugging Face config needs transformers: pip install 'fxpeft[test]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except Exception as e:
        raise CliError(f"MODEL {spec!r}: cannot read {directory / 'config.json'}: {str(e).splitlines()[0]}") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        causal = transformers.AutoModelForCausalLM
        cls = causal if type(config) in causal._model_mapping else transformers.AutoModel
    with_weights = path.is_dir() and any((directory / f).exists() for f in _WEIGHT_FILES)
    try:
        if with_weights:
            model = cls.from_pretrained(directory)
        else:  # a config alone: random weights, seeded so two runs draw and list the same model
            torch.manual_seed(0)
            model = cls.from_config(config) if hasattr(cls, "_model_mapping") else cls(config)
    except Exception as e:
        raise CliError(f"MODEL {spec!r}: transformers could not build {arch or cls.__name__}: "
                       f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    model.eval()
    args, kwargs = _hf_inputs(model, config)
    return model, args, kwargs


def load_model(spec: str):
    """Resolve a ``MODEL`` argument to ``(model, args, kwargs)`` (no inputs: ``args == ()`` and ``kwargs == {}``).

    Args:
        spec: ``pkg.module:fn``, ``pkg.module:fn(layers=16)``, or a local Hugging Face model directory
            (or its ``config.json``).

    Raises:
        CliError: the module, attribute or directory does not exist, or the factory returned no model.

    Example:
        >>> from fxpeft.cli import load_model
        >>> model, args, kwargs = load_model("fxpeft.zoo:cnn")
        >>> type(model).__name__, args[0].shape
        ('SmallCNN', torch.Size([2, 3, 16, 16]))
    """
    from torch import nn

    path = Path(spec).expanduser()
    if path.exists() and (path.is_dir() or path.name == "config.json"):
        return _from_hf_dir(spec, path)
    if ":" not in spec:
        hint = ("it looks like a Hugging Face hub id; download it first (e.g. `huggingface-cli download "
                f"{spec} --local-dir DIR`) and pass DIR" if spec.count("/") == 1 and not spec.startswith((".", "/"))
                else "no such directory" if ("/" in spec or os.sep in spec) else "expected pkg.module:fn")
        raise CliError(f"MODEL {spec!r} is neither a factory pkg.module:fn nor a local model directory ({hint})")
    out = _from_factory(spec)  # a module class is a factory too: it is called
    if isinstance(out, nn.Module):
        return out, (), {}
    if isinstance(out, tuple) and out and isinstance(out[0], nn.Module):
        model, rest = out[0], tuple(out[1:])
        args: Any = rest[0] if rest else ()
        kwargs: Any = rest[1] if len(rest) > 1 else {}
        if isinstance(args, dict) and len(rest) == 1:
            args, kwargs = (), args
        if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict) or len(rest) > 2:
            raise CliError(f"MODEL {spec!r} returned a tuple that is not (model, args, kwargs)")
        return model, tuple(args), dict(kwargs)
    raise CliError(f"MODEL {spec!r} returned {type(out).__name__}; a factory must return an nn.Module or "
                   "(model, args, kwargs)")


def _trace(spec: str, fx_only: bool):
    import fxpeft

    model, args, kwargs = load_model(spec)
    if fx_only or not (args or kwargs):
        return fxpeft.trace(model), "torch.fx.symbolic_trace"
    return fxpeft.trace(model, args, kwargs), "torch.export"


# --------------------------------------------------------------------------------------------------------
# --<method> SPEC (one option per registered method)
# --------------------------------------------------------------------------------------------------------

# Keys every method's spec accepts, beyond its config's field names and its own ``Method.spec_aliases``.
_GENERIC_ALIASES = {"target": "target_modules", "targets": "target_modules", "exclude": "exclude_modules"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _spec_keys(method) -> dict[str, str]:
    """Every key a ``--<method>`` spec accepts -> the config field it sets."""
    fields = [f.name for f in dataclasses.fields(method.config_cls) if f.init]
    keys = {name: name for name in fields}
    keys.update({k: v for k, v in _GENERIC_ALIASES.items() if v in keys})
    keys.update({k: v for k, v in method.spec_aliases.items() if v in keys})
    return keys


def _field_types(config_cls) -> dict[str, list]:
    """Each field's annotation as the list of its union's members, ``None`` left out (``list[str] | str | None``
    -> ``[list[str], str]``)."""
    hints = typing.get_type_hints(config_cls)
    out = {}
    for f in dataclasses.fields(config_cls):
        tp = hints.get(f.name, str)
        parts = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        out[f.name] = [t for t in parts if t is not type(None)]
    return out


def _container(parts: list, kind: type):
    """The ``list[...]`` (or ``dict[...]``) member of a field's annotation, or None."""
    return next((t for t in parts if t is kind or typing.get_origin(t) is kind), None)


def _scalar(raw: str, parts: list, what: str):
    """``raw`` as the first of the annotation's scalar types it reads as: bool words, int, float, then str."""
    low = raw.lower()
    if bool in parts and low in _TRUE + _FALSE:
        return low in _TRUE
    if int in parts:
        try:
            return int(raw)
        except ValueError:
            pass
    if float in parts:
        try:
            value = float(raw)
        except ValueError:
            pass
        else:
            if not math.isfinite(value):
                raise CliError(f"{what}={raw!r} is not a finite number")
            # 16 stays an int (as PEFT writes lora_alpha); 0.5 is a float.
            return int(value) if value.is_integer() and "." not in raw and "e" not in low else value
    if str in parts or not parts or any(t is typing.Any for t in parts):
        return raw
    names = " or ".join(getattr(t, "__name__", str(t)) for t in parts)
    raise CliError(f"{what}={raw!r} is not a valid value (expected {names})")


def _set(values: dict[str, Any], name: str, raw: str, parts: list, what: str) -> bool:
    """Store one ``key=value``; returns whether a following bare word extends it (a list or dict value)."""
    listed, mapping = _container(parts, list), _container(parts, dict)
    if listed is not None:
        if str in parts and (raw.lower() in ("all-linear", "all_linear") or raw.startswith("re:")):
            values[name] = raw[3:] if raw.startswith("re:") else "all-linear"  # one string: a selector, no list
            return False
        item = (typing.get_args(listed) or (str,))[0]
        values[name] = [_scalar(raw, [item], what)] if raw else []
        return True
    if mapping is not None:
        values[name] = {}
        _dict_item(values[name], mapping, raw, what)
        return True
    values[name] = _scalar(raw, parts, what)
    return False


def _dict_item(target: dict, mapping, raw: str, what: str) -> None:
    key, sep, value = raw.partition(":")
    if not sep or not key.strip():
        raise CliError(f"{what}={raw!r} is not a valid value; write {what.split(': ')[-1]}=KEY:VALUE,KEY:VALUE")
    item = (typing.get_args(mapping) or (str, str))[-1]
    target[key.strip()] = _scalar(value.strip(), [item], f"{what}[{key.strip()}]")


def parse_adapter_spec(spec: str, method_name: str):
    """Parse a ``--<method>`` SPEC (``r=8,target=q_proj,v_proj``) into that registered method's config.

    Pairs are ``key=value``, separated by commas. Keys are the config's field names, the method's
    ``spec_aliases`` (LoRA: ``alpha``, ``dropout``, ...), or ``target`` / ``exclude`` (``target_modules`` /
    ``exclude_modules``). Values are read by the field's annotation: ``int``, ``float`` (finite), ``bool``
    (``true``/``false``), ``str``; a list field takes the value and every bare word after it
    (``target=q_proj,v_proj``), or ``all-linear`` / ``re:REGEX``; a dict field takes ``KEY:VALUE`` items
    (``rank_pattern=q_proj:16,v_proj:4``). The config is validated as the library validates it.

    Raises:
        CliError: an unknown key, a value of the wrong type, or a config the method refuses.

    Example:
        >>> from fxpeft import LoraConfig, PeftRegistry
        >>> from fxpeft.cli import parse_adapter_spec
        >>> name = PeftRegistry.for_config(LoraConfig()).name
        >>> c = parse_adapter_spec("r=8,alpha=16,target=q_proj,v_proj", name)
        >>> c.r, c.lora_alpha, c.target_modules
        (8, 16, ['q_proj', 'v_proj'])
    """
    from .registry import PeftRegistry

    try:
        method = PeftRegistry.get(method_name)
    except FxPeftError as e:
        raise CliError(str(e)) from None
    flag, keys, types_of = f"--{method.name}", _spec_keys(method), _field_types(method.config_cls)
    values: dict[str, Any] = {}
    extends: str | None = None  # the list/dict field a bare word adds to
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if "=" not in token:
            if extends is None:
                raise CliError(f"{flag}: {token!r} has no key; write key=value pairs, e.g. {flag} target=a,b")
            if isinstance(values[extends], dict):
                _dict_item(values[extends], _container(types_of[extends], dict), token, f"{flag}: {extends}")
            else:
                item = (typing.get_args(_container(types_of[extends], list)) or (str,))[0]
                values[extends].append(_scalar(token, [item], f"{flag}: {extends}"))
            continue
        key, _, raw = (x.strip() for x in token.partition("="))
        if key not in keys:
            short = sorted(k for k in keys if k != keys[k])
            raise CliError(f"{flag}: unknown key {key!r}; use one of {sorted(set(keys.values()))} (or {short})")
        name = keys[key]
        extends = name if _set(values, name, raw, types_of[name], f"{flag}: {key}") else None
    try:
        config = method.config_cls(**values)
        method.validate_config(config)
    except (FxPeftError, TypeError, ValueError) as e:
        raise CliError(f"{flag}: {e}") from None
    return config


def _spec_help(method) -> str:
    """``--<method>``'s help, from the method's display name and its config's fields."""
    keys = _spec_keys(method)
    fields = [f for f in dict.fromkeys(keys.values())]
    short = ", ".join(f"{k}={v}" for k, v in keys.items() if k != v)
    return (f"apply {method.display_name} first (repeatable; adapters stack in command-line order). SPEC: "
            f"key=value pairs, keys {', '.join(fields)}" + (f"; short keys {short}" if short else ""))


class _AdapterAction(argparse.Action):
    """Records ``--<method> SPEC`` as ``(method, SPEC)`` in one list, so adapters stack in the order written."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(getattr(namespace, self.dest, None) or []) + [(self.const, values)])


# --------------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    import fxpeft
    from fxpeft.targeting import output_heads

    gm, how = _trace(args.model, args.fx)
    sites = fxpeft.find_sites(gm)
    rows = [s for s in sites.values() if not args.kind or s.kind == args.kind]
    heads = output_heads(gm, sites)
    if args.json:
        records = [json.dumps({"name": s.name, "kind": s.kind, "module_type": s.module_type,
                               "weight_shape": list(s.weight_shape), "calls": len(s.calls),
                               "fan_in_fan_out": s.fan_in_fan_out, "output_head": s.name in heads}) for s in rows]
        print("[\n " + ",\n ".join(records) + "\n]" if records else "[]")
        return 0
    print(f"{args.model}: captured with {how}, {len(gm.graph.nodes)} FX nodes, {len(sites)} targetable sites")
    width = max([len(s.name) for s in rows] + [4])
    print(f"{'site':<{width}}  {'kind':<9}  {'module':<16}  {'weight':<14}  calls")
    for s in rows:
        note = "  (output head: not in all-linear)" if s.name in heads else ""
        shape = "×".join(map(str, s.weight_shape)) + (" (in,out)" if s.fan_in_fan_out else "")
        print(f"{s.name:<{width}}  {s.kind:<9}  {s.module_type[:16]:<16}  {shape:<14}  {len(s.calls)}{note}")
    leaves: dict[str, list] = {}
    for s in rows:
        leaves.setdefault(s.name.rsplit(".", 1)[-1], []).append(s)
    print("\ntarget_modules names (sites matched): " + ", ".join(f"{k} ({len(v)})" for k, v in leaves.items()))
    # Suggest the most repeated non-head sites: in a transformer, the per-layer projections.
    body = sorted((k for k, v in leaves.items() if not any(s.name in heads for s in v)),
                  key=lambda k: -len(leaves[k]))
    if body:
        from .registry import PeftRegistry

        print("e.g. " + "\n     ".join(f"fxpeft draw {args.model} --out graph.svg --{name} target={','.join(body[:2])}"
                                       for name in PeftRegistry.names()))
    return 0


def _parse_depth(text: str) -> int | None:
    if text in ("auto", "none"):
        return None
    if text in ("all", "full"):
        return 1_000
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, 'auto' or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("depth must be >= 0")
    return value


def _draw(args: argparse.Namespace) -> int:
    import fxpeft

    from .registry import PeftRegistry

    configs = [(m, parse_adapter_spec(s, m)) for m, s in args.adapters]
    if (args.merge or args.diff) and not configs:
        flags = " or ".join(f"--{n}" for n in PeftRegistry.names())
        raise CliError(f"--merge and --diff need a pass to show: add {flags} "
                       f"(e.g. fxpeft draw {args.model} --out {args.out} --{PeftRegistry.names()[0]} target=... --diff)")
    out = Path(args.out)
    if out.suffix.lower() not in (".svg", ".png", ".pdf", ".dot", ".gv"):
        raise CliError(f"--out {args.out!r}: the extension picks the format; use .svg, .png, .pdf or .dot")
    _check_writable(out)  # before tracing, which can take minutes
    gm, how = _trace(args.model, args.fx)
    # Snapshots, not the graph: every pass changes gm in place.
    before = fxpeft.to_networkx(gm) if args.diff and not args.merge else None
    for i, (method, config) in enumerate(configs):
        name = "default" if len(configs) == 1 else f"{method}{i}"
        gm = fxpeft.rewrite(gm, config, adapter_name=name, fuse=not args.no_fuse)
    if args.merge:
        if args.diff:
            before = fxpeft.to_networkx(gm)
        gm = fxpeft.merge(gm)
    t = time.perf_counter()
    try:
        path = fxpeft.draw(gm, out, depth=args.depth, before=before, fold_repeats=not args.no_fold,
                           compact=not args.all_nodes, shapes=not args.no_shapes, rankdir=args.rankdir,
                           max_nodes=args.max_nodes, title=args.title)
    except OSError as e:
        raise CommandError(f"--out {args.out!r}: cannot write it ({e.strerror or e}); pick a writable path") from e
    took = time.perf_counter() - t
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1e3:.0f} kB, {took:.1f} s) from {args.model} ({how}, {len(gm.graph.nodes)} FX nodes)")
    return 0


def _check_writable(out: Path) -> None:
    """Refuse an ``--out`` whose directory cannot exist or be written (the nearest existing ancestor decides)."""
    parent = out.parent.absolute()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if out.is_dir():
        raise CommandError(f"--out {str(out)!r} is a directory; name a file in it, e.g. {out / 'graph.svg'}")
    if not parent.is_dir():
        raise CommandError(f"--out {str(out)!r}: {parent} is not a directory; pick a writable path")
    if not os.access(parent, os.W_OK):
        raise CommandError(f"--out {str(out)!r}: {parent} is not writable; pick a writable path")


def _merge(args: argparse.Namespace) -> int:
    """``fxpeft merge BASE ADAPTER OUT``: load a PEFT-format adapter onto BASE, merge, write safetensors (and a .pt2)."""
    import time

    import fxpeft

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"OUT {str(out)!r} is a file; name a directory for the merged checkpoint")
    _check_writable(out / "model.safetensors")
    steps = 5 if args.pt2 else 3  # without --pt2, merging and writing are one step (4 if the merge cannot stream)
    start = time.perf_counter()

    def step(i: int, what: str) -> None:  # progress on stderr: stdout stays clean for scripts
        print(f"fxpeft merge: [{i}/{steps}] {what} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)

    step(1, f"loading {args.base}")
    model, margs, mkwargs = load_model(args.base)
    if args.pt2 and not (margs or mkwargs):
        raise CliError("--pt2 needs example inputs: BASE must be an HF model directory or a factory returning "
                       "(model, args, kwargs)")
    gm = fxpeft.trace(model, margs, mkwargs) if (margs or mkwargs) else fxpeft.trace(model)
    step(2, f"loading the adapter {args.adapter}")
    fxpeft.load_adapter(gm, args.adapter)
    config = getattr(model, "config", None)
    files = None
    if not args.pt2:  # nothing needs the merged graph: each merged weight is computed as its shard is written
        step(3, f"merging {len(fxpeft.adapters(gm))} adapted sites while writing {out}")
        try:
            files = fxpeft.save_merged(gm, out, max_shard_size=args.max_shard_size, config=config, merge=True)
        except fxpeft.errors.AdapterFileError as e:  # a merge that changes more than weights (a tie): merged first
            print(f"fxpeft merge: cannot merge while writing ({e}); merging first", file=sys.stderr, flush=True)
            files, steps = None, 4
    if files is None:
        step(3, f"merging {len(fxpeft.adapters(gm))} adapted sites")
        fxpeft.merge(gm)
        step(4, f"writing {out}")
        files = fxpeft.save_merged(gm, out, max_shard_size=args.max_shard_size, config=config)
    if args.pt2:
        step(5, f"exporting {out / 'model.pt2'}")
        fxpeft.export(gm, out / "model.pt2", margs, mkwargs)
    print("\n".join(str(out / f) for f in files + (["model.pt2"] if args.pt2 else [])))
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    import fxpeft

    files = fxpeft.consolidate_adapter(args.checkpoint, args.out)
    print("\n".join(str(Path(args.out) / f) for f in files))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, draw=not args.no_draw)
    return 0


_MODEL_HELP = ("a Python factory pkg.module:fn (e.g. fxpeft.zoo:tiny_llama, or fxpeft.zoo:tiny_llama(layers=16)) "
               "returning a model or (model, args, kwargs): fxpeft IMPORTS pkg.module AND RUNS fn, i.e. executes "
               "that Python code, so only name code you trust; or a local Hugging Face model directory with "
               "config.json")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other error: ``fxpeft draw: error: ...``, status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``fxpeft`` argument parser (``inspect``, ``draw``, ``merge``, ``consolidate``, ``demo``).

    Example:
        >>> from fxpeft.cli import build_parser
        >>> build_parser().parse_args(["draw", "fxpeft.zoo:cnn", "--out", "g.svg", "--depth", "2"]).depth
        2
    """
    from .registry import PeftRegistry

    parser = _Parser(
        prog="fxpeft", description="PEFT as compiler surgery on a torch.fx graph. A MODEL written pkg.module:fn "
                                   "imports that Python module and runs fn (it executes that code).",
        epilog="Run `fxpeft COMMAND --help` for a command's options.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    fmt = argparse.RawDescriptionHelpFormatter
    insp = sub.add_parser(
        "inspect", help="list a model's targetable sites (what to put in target_modules)", formatter_class=fmt,
        description="Trace MODEL and list every site an adapter can target: name, kind, module class, weight "
                    "shape and how many calls apply it.",
        epilog="examples:\n  fxpeft inspect fxpeft.zoo:tiny_llama\n  fxpeft inspect fxpeft.zoo:cnn --kind conv\n"
               "  fxpeft inspect ./my-hf-model --json")
    insp.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    insp.add_argument("--kind", choices=("linear", "conv", "embedding"), help="only sites of this kind")
    insp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    insp.add_argument("--fx", action="store_true", help="trace with torch.fx.symbolic_trace even when MODEL gives inputs")
    _add_debug(insp)
    insp.set_defaults(func=_inspect)

    methods = "/".join(f"--{n}" for n in PeftRegistry.names())
    draw = sub.add_parser(
        "draw", help="draw a model's graph (optionally after adapter rewrites) to SVG/PNG/PDF/DOT",
        formatter_class=fmt,
        description="Trace MODEL, apply the adapters asked for, and draw the graph with Graphviz: module clusters, "
                    "adapter nodes coloured by method, edges labelled with shapes.",
        epilog="examples:\n"
               "  fxpeft draw fxpeft.zoo:tiny_llama --out llama.svg --lora r=8,target=q_proj,v_proj\n"
               "  fxpeft draw fxpeft.zoo:tiny_llama --out diff.svg --lora target=all-linear --diff\n"
               "  fxpeft draw fxpeft.zoo:cnn --out merge.png --lora target=conv1,conv2 --merge --diff\n"
               "  fxpeft draw fxpeft.zoo:tiny_bert --out ia3.svg --ia3 target=key,value,output.dense,ff=output.dense\n\n"
               f"{methods} take key=value pairs; a bare word extends the list before it (target=q_proj,v_proj).\n"
               "keys: the method's config fields (see each option) or their short forms; target=all-linear and\n"
               "target=re:REGEX work too. Values are checked as the config's types (int, finite float, bool, ...).\n"
               "Rendering needs Graphviz's `dot` (Debian/Ubuntu: apt-get install graphviz); without it the .dot is written.")
    draw.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    draw.add_argument("--out", "-o", required=True, help="output file; the extension picks the format (.svg .png .pdf .dot)")
    draw.add_argument("--depth", type=_parse_depth, default=None, metavar="N",
                      help="draw module clusters deeper than N as one box each; 'auto' (default) opens what the "
                           "adapters touch within --max-nodes, 'all' opens everything")
    for method in PeftRegistry.methods():  # one option per registered method: a new method file adds its own
        draw.add_argument(f"--{method.name}", action=_AdapterAction, dest="adapters", const=method.name, default=[],
                          metavar="SPEC", help=_spec_help(method))
    draw.add_argument("--merge", action="store_true", help="merge the adapters after applying them")
    draw.add_argument("--diff", action="store_true",
                      help="mark what the rewrite added (green), or with --merge what the merge removed (red)")
    draw.add_argument("--no-fuse", action="store_true",
                      help="keep one adapter chain per site (no fusion of sibling sites that read one input)")
    draw.add_argument("--no-fold", action="store_true", help="draw every repeated block instead of one with ×N")
    draw.add_argument("--all-nodes", action="store_true", help="draw every FX node (parameter reads, views, asserts too)")
    draw.add_argument("--no-shapes", action="store_true", help="no shape labels on edges")
    draw.add_argument("--rankdir", choices=("TB", "LR", "BT", "RL"), default="TB", help="layout direction (default: TB)")
    draw.add_argument("--max-nodes", type=int, default=250, help="node budget of the automatic depth (default: %(default)s)")
    draw.add_argument("--title", help="caption (default: graph name, dialect, node count, adapters)")
    draw.add_argument("--fx", action="store_true", help="trace with torch.fx.symbolic_trace even when MODEL gives inputs")
    _add_debug(draw)
    draw.set_defaults(func=_draw)

    merge = sub.add_parser(
        "merge", help="merge a PEFT-format adapter into a model and write the merged weights",
        formatter_class=fmt,
        description="Load ADAPTER (a PEFT-format directory, written by PEFT or fxpeft) onto BASE, fold it into the "
                    "weights, and write OUT as safetensors that the model class's from_pretrained loads (with "
                    "config.json when BASE has a config). Progress goes to stderr; the files written to stdout.",
        epilog="examples:\n  fxpeft merge ./llama-base ./my-lora ./llama-merged\n"
               "  fxpeft merge ./llama-base ./my-lora ./llama-merged --pt2 --max-shard-size 2GB")
    merge.add_argument("base", metavar="BASE", help=_MODEL_HELP)
    merge.add_argument("adapter", metavar="ADAPTER", help="a PEFT-format adapter directory")
    merge.add_argument("out", metavar="OUT", help="output directory (created if missing)")
    merge.add_argument("--pt2", action="store_true", help="also write OUT/model.pt2 (torch.export of the merged graph)")
    merge.add_argument("--max-shard-size", default="5GB", help="shard size (default: %(default)s)")
    _add_debug(merge)
    merge.set_defaults(func=_merge)

    cons = sub.add_parser(
        "consolidate", help="write a distributed (DCP) adapter checkpoint as a PEFT-format directory",
        formatter_class=fmt,
        description="Read CHECKPOINT (written by fxpeft.save_adapter_dcp on any number of processes) in one process "
                    "and write OUT as adapter_config.json + adapter_model.safetensors, which PEFT and "
                    "fxpeft.load_adapter read. The files written go to stdout.",
        epilog="example:\n  fxpeft consolidate ./ckpt/step-1000 ./my-lora")
    cons.add_argument("checkpoint", metavar="CHECKPOINT", help="a torch.distributed.checkpoint adapter directory")
    cons.add_argument("out", metavar="OUT", help="output directory (created if missing)")
    _add_debug(cons)
    cons.set_defaults(func=_consolidate)

    demo = sub.add_parser("demo", help="trace a tiny Llama, rewrite, train, merge, export and draw",
                          description="The README's main job: trace → LoRA rewrite → train → merge → export → draw.")
    demo.add_argument("--out", default="fxpeft-demo", help="output directory (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=30, help="training steps (default: %(default)s)")
    demo.add_argument("--no-draw", action="store_true", help="skip drawing the graph")
    _add_debug(demo)
    demo.set_defaults(func=_demo)
    return parser


def _add_debug(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not overwrite `fxpeft --debug draw ...`.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback of an error")


def main(argv: list[str] | None = None) -> int:
    """Run the ``fxpeft`` command; returns the exit status (0 ok, 1 an fxpeft error, 2 a usage error).

    Errors are one line on stderr, ``fxpeft COMMAND: error: ...``, without a traceback (``--debug`` prints it).

    Example:
        >>> from fxpeft.cli import main
        >>> main(["inspect", "fxpeft.zoo:cnn", "--kind", "linear", "--json"])
        [
         {"name": "fc", "kind": "linear", "module_type": "Linear", "weight_shape": [10, 32], "calls": 1, "fan_in_fan_out": false, "output_head": false}
        ]
        0
    """
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the command's parser, so the line names the command (`fxpeft draw: error:`)
            command = _commands(parser).get(getattr(args, "command", None), parser)
            hint = ""
            if command.prog.endswith(" draw") and any(x.startswith("--") for x in extra):
                from .registry import PeftRegistry

                hint = "; adapter options: " + ", ".join(f"--{n}" for n in PeftRegistry.names())
            command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    except SystemExit as e:  # --help exits 0 (let it); a usage error already printed its one line
        if not e.code:
            raise
        return e.code if isinstance(e.code, int) else 2
    if not hasattr(args, "func"):
        print(f"fxpeft: error: name a COMMAND ({', '.join(sorted(_commands(parser)))}); see `fxpeft --help`",
              file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fxpeft inspect MODEL | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - every error ends as one line; --debug adds the traceback
        return _report(args.command, e, getattr(args, "debug", False))


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _report(command: str, e: Exception, debug: bool) -> int:
    """Print ``e`` as one line ``fxpeft COMMAND: error: ...`` (after its traceback with ``--debug``); return the status.

    A command-line mistake (:class:`CliError`) is status 2; anything else 1. An fxpeft error's message names
    the fix; a file-system error says what it could not do; anything else is a bug or the user's code failing.
    """
    if debug:
        traceback.print_exc()
    if isinstance(e, FxPeftError):
        message = str(e)
    elif isinstance(e, OSError):
        message = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    else:
        message = f"unexpected {_describe(e)}" + ("" if debug else " (run again with --debug for the traceback)")
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"fxpeft {command}: error: {message}", file=sys.stderr)
    return 2 if isinstance(e, CliError) else 1


if __name__ == "__main__":
    sys.exit(main())
