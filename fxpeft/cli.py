"""The ``fxpeft`` command line: ``inspect`` a model's sites, ``draw`` its graph, run the ``demo``.

``MODEL`` is either

* a Python factory ``pkg.module:fn`` (or ``pkg.module:fn(layers=16)`` with literal arguments) returning a
  model, or a model with example inputs (an :class:`fxpeft.zoo.Example` or a ``(model, args, kwargs)``
  tuple). With inputs the model is captured with ``torch.export``, without with ``torch.fx.symbolic_trace``;
* a local Hugging Face model directory (or its ``config.json``): the model is built from the config, and
  loaded with its weights when the directory has them; it is captured with example ``input_ids``.

Examples::

    fxpeft inspect fxpeft.zoo:tiny_llama
    fxpeft draw fxpeft.zoo:tiny_llama --out llama.svg --lora r=8,target=q_proj,v_proj
    fxpeft draw fxpeft.zoo:cnn --out cnn.png --lora target=conv1,conv2 --merge --diff
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .errors import FxPeftError

__all__ = ["main", "build_parser", "load_model", "parse_adapter_spec"]


class CliError(FxPeftError):
    """A command-line mistake (a MODEL that cannot be found, a malformed ``--lora``); the message names the fix."""


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
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise CliError(f"MODEL {spec!r}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?") from None
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
        return obj(*args, **kwargs)
    except TypeError as e:
        raise CliError(f"MODEL {spec!r}: calling {name}(...) failed: {e}") from None


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
# --lora / --ia3
# --------------------------------------------------------------------------------------------------------

_ALIASES = {"rank": "r", "target": "target_modules", "targets": "target_modules", "exclude": "exclude_modules",
            "ff": "feedforward_modules", "feedforward": "feedforward_modules", "alpha": "lora_alpha",
            "dropout": "lora_dropout", "rslora": "use_rslora", "init": None}
_LIST_FIELDS = {"target_modules", "exclude_modules", "feedforward_modules"}


def _parse_value(field: dataclasses.Field, raw: str, flag: str):
    default = field.default if field.default is not dataclasses.MISSING else None
    low = raw.lower()
    try:
        if isinstance(default, bool) or field.name.startswith("init_"):
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            if field.name == "init_lora_weights" and low == "gaussian":
                return "gaussian"
            raise ValueError
        if field.name == "lora_alpha":
            v = float(raw)
            return int(v) if v.is_integer() else v
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise CliError(f"{flag}: {field.name}={raw!r} is not a valid value") from None
    return raw


def parse_adapter_spec(spec: str, method: str):
    """Parse ``--lora r=8,target=q_proj,v_proj`` (or ``--ia3 target=k_proj,v_proj,ff=down_proj``) to a config.

    Pairs are ``key=value``, separated by commas; a bare word continues the list of the key before it
    (``target=q_proj,v_proj``). Keys are the config's field names (``target_modules``, ``lora_alpha``) or the
    short forms ``target``, ``exclude``, ``ff``, ``alpha``, ``dropout``, ``rslora``, ``init``.
    ``target=all-linear`` selects every linear site but the output head; ``target=re:PATTERN`` a regex.

    Example:
        >>> from fxpeft.cli import parse_adapter_spec
        >>> c = parse_adapter_spec("r=8,alpha=16,target=q_proj,v_proj", "lora")
        >>> c.r, c.lora_alpha, c.target_modules
        (8, 16, ['q_proj', 'v_proj'])
    """
    from .registry import PeftRegistry

    cls = PeftRegistry.get(method).config_cls
    # Dict fields (rank_pattern, alpha_pattern) have no key=value spelling; the Python API takes them.
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.default_factory is not dict}
    flag = f"--{method}"
    values: dict[str, Any] = {}
    last: str | None = None
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if "=" not in token:
            if last in _LIST_FIELDS:
                values[last].append(token)
                continue
            raise CliError(f"{flag}: {token!r} has no key; write key=value pairs, e.g. {flag} r=8,target=q_proj,v_proj")
        key, _, raw = token.partition("=")
        key = key.strip()
        name = _ALIASES.get(key, key)
        if key == "init":
            name = next((f for f in fields if f.startswith("init_")), key)
        if name not in fields:
            short = sorted(k for k, v in _ALIASES.items() if (v in fields) or (k == "init"))
            raise CliError(f"{flag}: unknown key {key!r}; use one of {sorted(fields)} (or {short})")
        if name in _LIST_FIELDS:
            raw = raw.strip()
            if raw.lower() in ("all-linear", "all_linear") or raw.startswith("re:"):
                values[name] = raw[3:] if raw.startswith("re:") else "all-linear"
                last = None
                continue
            values[name] = [raw] if raw else []
        else:
            values[name] = _parse_value(fields[name], raw.strip(), flag)
        last = name
    return cls(**values)


# --------------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    import fxpeft
    from fxpeft.passes.inject import output_heads

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
        print(f"e.g. fxpeft draw {args.model} --out graph.svg --lora r=8,target={','.join(body[:2])}")
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

    configs = [(m, parse_adapter_spec(s, m)) for m, specs in (("lora", args.lora), ("ia3", args.ia3)) for s in specs or ()]
    if (args.merge or args.diff) and not configs:
        raise CliError("--merge and --diff need a pass to show: add --lora or --ia3 "
                       f"(e.g. fxpeft draw {args.model} --out {args.out} --lora r=8 --diff)")
    out = Path(args.out)
    if out.suffix.lower() not in (".svg", ".png", ".pdf", ".dot", ".gv"):
        raise CliError(f"--out {args.out!r}: the extension picks the format; use .svg, .png, .pdf or .dot")
    gm, how = _trace(args.model, args.fx)
    # Snapshots, not the graph: every pass changes gm in place.
    before = fxpeft.to_networkx(gm) if args.diff and not args.merge else None
    for i, (method, config) in enumerate(configs):
        extra = {"fuse": False} if args.no_fuse and method == "lora" else {}
        name = "default" if len(configs) == 1 else f"{method}{i}"
        gm = fxpeft.rewrite(gm, config, adapter_name=name, **extra)
    if args.merge:
        if args.diff:
            before = fxpeft.to_networkx(gm)
        gm = fxpeft.merge(gm)
    t = time.perf_counter()
    path = fxpeft.draw(gm, out, depth=args.depth, before=before, fold_repeats=not args.no_fold,
                       compact=not args.all_nodes, shapes=not args.no_shapes, rankdir=args.rankdir,
                       max_nodes=args.max_nodes, title=args.title)
    took = time.perf_counter() - t
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1e3:.0f} kB, {took:.1f} s) from {args.model} ({how}, {len(gm.graph.nodes)} FX nodes)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, draw=not args.no_draw)
    return 0


_MODEL_HELP = ("a factory pkg.module:fn (e.g. fxpeft.zoo:tiny_llama, or fxpeft.zoo:tiny_llama(layers=16)) returning "
               "a model or (model, args, kwargs), or a local Hugging Face model directory with config.json")


def build_parser() -> argparse.ArgumentParser:
    """The ``fxpeft`` argument parser (``inspect``, ``draw``, ``demo``).

    Example:
        >>> from fxpeft.cli import build_parser
        >>> build_parser().parse_args(["draw", "fxpeft.zoo:cnn", "--out", "g.svg", "--depth", "2"]).depth
        2
    """
    parser = argparse.ArgumentParser(
        prog="fxpeft", description="PEFT as compiler surgery on a torch.fx graph.",
        epilog="Run `fxpeft COMMAND --help` for a command's options.")
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
    insp.set_defaults(func=_inspect)

    draw = sub.add_parser(
        "draw", help="draw a model's graph (optionally after a LoRA/IA3 rewrite) to SVG/PNG/PDF/DOT",
        formatter_class=fmt,
        description="Trace MODEL, apply the adapters asked for, and draw the graph with Graphviz: module clusters, "
                    "adapter nodes coloured by method, edges labelled with shapes.",
        epilog="examples:\n"
               "  fxpeft draw fxpeft.zoo:tiny_llama --out llama.svg --lora r=8,target=q_proj,v_proj\n"
               "  fxpeft draw fxpeft.zoo:tiny_llama --out diff.svg --lora target=all-linear --diff\n"
               "  fxpeft draw fxpeft.zoo:cnn --out merge.png --lora target=conv1,conv2 --merge --diff\n"
               "  fxpeft draw fxpeft.zoo:tiny_bert --out ia3.svg --ia3 target=key,value,output.dense,ff=output.dense\n\n"
               "--lora/--ia3 take key=value pairs; a bare word extends the list before it (target=q_proj,v_proj).\n"
               "keys: the config's fields (r, lora_alpha, lora_dropout, target_modules, exclude_modules, ...) or\n"
               "target, exclude, alpha, dropout, rslora, init, ff. target=all-linear and target=re:REGEX work too.\n"
               "Rendering needs Graphviz's `dot` (Debian/Ubuntu: apt-get install graphviz); without it the .dot is written.")
    draw.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    draw.add_argument("--out", "-o", required=True, help="output file; the extension picks the format (.svg .png .pdf .dot)")
    draw.add_argument("--depth", type=_parse_depth, default=None, metavar="N",
                      help="draw module clusters deeper than N as one box each; 'auto' (default) opens what the "
                           "adapters touch within --max-nodes, 'all' opens everything")
    draw.add_argument("--lora", action="append", metavar="SPEC", help="apply LoRA first, e.g. r=8,alpha=16,target=q_proj,v_proj")
    draw.add_argument("--ia3", action="append", metavar="SPEC", help="apply IA3 first, e.g. target=k_proj,v_proj,down_proj,ff=down_proj")
    draw.add_argument("--merge", action="store_true", help="merge the adapters after applying them")
    draw.add_argument("--diff", action="store_true",
                      help="mark what the rewrite added (green), or with --merge what the merge removed (red)")
    draw.add_argument("--no-fuse", action="store_true", help="keep one LoRA chain per site (no sibling fusion)")
    draw.add_argument("--no-fold", action="store_true", help="draw every repeated block instead of one with ×N")
    draw.add_argument("--all-nodes", action="store_true", help="draw every FX node (parameter reads, views, asserts too)")
    draw.add_argument("--no-shapes", action="store_true", help="no shape labels on edges")
    draw.add_argument("--rankdir", choices=("TB", "LR", "BT", "RL"), default="TB", help="layout direction (default: TB)")
    draw.add_argument("--max-nodes", type=int, default=250, help="node budget of the automatic depth (default: %(default)s)")
    draw.add_argument("--title", help="caption (default: graph name, dialect, node count, adapters)")
    draw.add_argument("--fx", action="store_true", help="trace with torch.fx.symbolic_trace even when MODEL gives inputs")
    draw.set_defaults(func=_draw)

    demo = sub.add_parser("demo", help="trace a tiny Llama, rewrite, train, merge, export and draw",
                          description="The README's main job: trace → LoRA rewrite → train → merge → export → draw.")
    demo.add_argument("--out", default="fxpeft-demo", help="output directory (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=30, help="training steps (default: %(default)s)")
    demo.add_argument("--no-draw", action="store_true", help="skip drawing the graph")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``fxpeft`` command; returns the exit status (0 ok, 1 an fxpeft error, 2 a usage error).

    Errors are one line on stderr, ``fxpeft COMMAND: error: ...``, without a traceback.

    Example:
        >>> from fxpeft.cli import main
        >>> main(["inspect", "fxpeft.zoo:cnn", "--kind", "linear", "--json"])
        [
         {"name": "fc", "kind": "linear", "module_type": "Linear", "weight_shape": [10, 32], "calls": 1, "fan_in_fan_out": false, "output_head": true}
        ]
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except FxPeftError as e:
        # A user's mistake or a model fxpeft cannot handle: one line that names the fix, no traceback.
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"fxpeft {args.command}: error: {message}", file=sys.stderr)
        return 2 if isinstance(e, CliError) else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fxpeft inspect MODEL | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
