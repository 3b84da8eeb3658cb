"""The ``fxpeft`` command line: inspect, draw, demo; MODEL resolution; --<method> specs; error handling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import fxpeft
import fxpeft.zoo
from fxpeft.cli import CliError, build_parser, load_model, main, parse_adapter_spec
from fxpeft.tags import get_tag
from fxpeft.viz import _REMOVED

LORA_FILL = fxpeft.PeftRegistry.get("lora").color[0]
IA3_FILL = fxpeft.PeftRegistry.get("ia3").color[0]

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
REPO = Path(__file__).resolve().parents[2]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def subcommands() -> list[str]:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(action.choices)


def test_subcommands_are_there():
    assert {"inspect", "draw", "demo"} <= set(subcommands())


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in ["inspect", "draw", "demo"]])
def test_every_help_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: fxpeft")
    if argv[0] == "draw":
        assert "--lora" in text and "--ia3" in text and "--diff" in text and "apt-get install graphviz" in text
    if argv[0] in ("--help", "inspect", "draw"):  # a factory MODEL is code that runs: the help says so
        flat = " ".join(text.split()).lower()
        assert "imports" in flat and "runs" in flat and "pkg.module:fn" in flat


def test_each_registered_method_gets_its_own_option_from_the_registry(capsys, tmp_path, monkeypatch):
    @dataclass
    class ToyConfig(fxpeft.PeftConfigBase):
        width: int = 1
        gain: float = 1.0
        mode: bool | str = True
        per_site: dict[str, int] = field(default_factory=dict)

    class Toy(fxpeft.Method):
        name, display_name, config_cls = "toy", "ToyMethod", ToyConfig
        spec_aliases = {"w": "width"}

    monkeypatch.setitem(fxpeft.PeftRegistry._methods, "toy", Toy)
    with pytest.raises(SystemExit):
        main(["draw", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--toy SPEC" in help_text and "apply ToyMethod first" in help_text
    assert "width, gain, mode, per_site" in help_text and "w=width" in help_text
    args = build_parser().parse_args(["draw", "m:f", "--out", "g.svg", "--ia3", "target=a", "--toy", "w=3",
                                      "--lora", "r=2"])
    assert args.adapters == [("ia3", "target=a"), ("toy", "w=3"), ("lora", "r=2")]  # command-line order
    c = parse_adapter_spec("w=3,gain=0.5,mode=fast,per_site=a:2,b:4,target=x,y,exclude=z", "toy")
    assert (c.width, c.gain, c.mode, c.per_site) == (3, 0.5, "fast", {"a": 2, "b": 4})
    assert c.target_modules == ["x", "y"] and c.exclude_modules == ["z"]
    assert parse_adapter_spec("mode=off", "toy").mode is False


def test_inspect_lists_sites_with_kind_and_shape(capsys):
    code, out, _ = run(capsys, "inspect", "fxpeft.zoo:cnn")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:6]}
    assert rows["conv1"][1:4] == ["conv", "Conv2d", "16×3×3×3"]
    # As in PEFT, only a transformers model has an output head that all-linear leaves out.
    assert rows["fc"][1:4] == ["linear", "Linear", "10×32"] and "output head" not in " ".join(rows["fc"])
    assert "torch.export" in out.splitlines()[0] and "4 targetable sites" in out.splitlines()[0]
    assert "--lora target=" in out and "--ia3 target=" in out  # one example per registered method
    code, out, _ = run(capsys, "inspect", "fxpeft.zoo:cnn", "--json", "--kind", "conv", "--fx")
    records = json.loads(out)
    assert [r["name"] for r in records] == ["conv1", "conv2", "conv3"]
    assert records[1]["weight_shape"] == [32, 16, 3, 3]


@needs_dot
def test_draw_rewritten_model_to_svg(capsys, tmp_path):
    out = tmp_path / "cnn.svg"
    code, stdout, _ = run(capsys, "draw", "fxpeft.zoo:cnn", "--out", str(out), "--lora", "r=4,target=conv1,fc")
    assert code == 0 and f"wrote {out}" in stdout
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    assert LORA_FILL in out.read_text()


def test_draw_merge_diff_to_dot(capsys, tmp_path):
    out = tmp_path / "merge.dot"
    code, _, _ = run(capsys, "draw", "fxpeft.zoo:cnn", "--out", str(out), "--lora", "target=conv1,conv2",
                     "--merge", "--diff", "--depth", "all")
    assert code == 0
    src = out.read_text()
    # What the command merged away is what the same rewrite through the API inserts.
    ex = fxpeft.zoo.cnn()
    gm = fxpeft.rewrite(fxpeft.trace(ex.model, ex.args), fxpeft.LoraConfig(target_modules=["conv1", "conv2"]))
    tagged = [n for n in gm.graph.nodes if get_tag(n) is not None]
    assert f"diff: +0 / −{len(tagged)} FX nodes" in src
    removed = {line.split('"')[1] for line in src.splitlines()
               if _REMOVED in line and "dashed" in line and "->" not in line and "legend" not in line}
    assert removed == {n.name for n in tagged if n.op != "get_attr"}  # weight reads are not drawn
    assert sum(get_tag(n).role is fxpeft.Role.OUT for n in tagged) == 2


def test_draw_ia3_and_lora_and_factory_arguments(capsys, tmp_path):
    out = tmp_path / "f.dot"
    code, _, _ = run(capsys, "draw", "fxpeft.zoo:functional_lm(seed=1)", "--out", str(out),
                     "--lora", "r=2,alpha=4,target=w_in", "--ia3", "target=w_out", "--no-fold")
    assert code == 0
    src = out.read_text()
    assert LORA_FILL in src and IA3_FILL in src
    assert "IA3 adapter node" in src and "cluster_blocks.1" in src


def test_missing_graphviz_from_the_command_line(capsys, tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, _, err = run(capsys, "draw", "fxpeft.zoo:cnn", "--out", str(tmp_path / "g.png"), "--lora", "target=fc")
    assert code == 1
    assert "apt-get install graphviz" in err and err.count("\n") == 1
    assert (tmp_path / "g.dot").read_text().startswith("digraph")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "fxpeft.zoo:nope"], "has no attribute 'nope'"),
    (["inspect", "no_such_pkg.mod:fn"], "cannot import module 'no_such_pkg.mod'"),
    (["inspect", "meta-llama/Llama-2-7b"], "huggingface-cli download"),
    (["inspect", "fxpeft.zoo:cnn(seed=print)"], "literals"),
    (["draw", "fxpeft.zoo:cnn", "--out", "x.svg", "--lora", "r=8,conv1"], "has no key"),
    (["draw", "fxpeft.zoo:cnn", "--out", "x.svg", "--lora", "rnk=8"], "unknown key 'rnk'"),
    (["draw", "fxpeft.zoo:cnn", "--out", "x.svg", "--lora", "r=eight"], "r='eight' is not a valid value"),
    (["draw", "fxpeft.zoo:cnn", "--out", "x.svg", "--ia3", "ff"], "has no key"),
    (["draw", "fxpeft.zoo:cnn", "--out", "x.txt"], "extension"),
    (["draw", "fxpeft.zoo:cnn", "--out", "x.svg", "--diff"], "need a pass"),
])
def test_user_errors_are_one_line_with_status_2(argv, needle, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert needle in err and err.startswith(f"fxpeft {argv[0]}: error:") and err.count("\n") == 1


def test_fxpeft_errors_from_the_library_exit_1(capsys, tmp_path):
    code, _, err = run(capsys, "draw", "fxpeft.zoo:cnn", "--out", str(tmp_path / "x.dot"), "--lora", "target=q_proj")
    assert code == 1 and "matches no targetable site" in err and "conv1" in err and err.count("\n") == 1


def test_console_script_error_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "fxpeft.cli", "draw", "nowhere", "--out", str(tmp_path / "x.svg")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "neither a factory" in proc.stderr


def test_model_factories_and_tuples(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def plain():
            return nn.Sequential(nn.Linear(4, 4))

        def pair():
            return nn.Linear(4, 2), {"input": torch.randn(3, 4)}

        triple = (nn.Linear(4, 2), (torch.randn(3, 4),), {})
        model_object = nn.Linear(4, 2)  # a module is callable, but it is the model, not a factory

        def not_a_model():
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model, args, kwargs = load_model("my_models:plain")
    assert args == () and kwargs == {}
    model, args, kwargs = load_model("my_models:pair")
    assert args == () and list(kwargs) == ["input"]
    model, args, kwargs = load_model("my_models:triple")
    assert args[0].shape == (3, 4)
    model, args, kwargs = load_model("my_models:model_object")
    assert type(model).__name__ == "Linear" and args == ()
    model, args, kwargs = load_model("torch.nn:Identity")  # a module class is instantiated
    assert type(model).__name__ == "Identity"
    with pytest.raises(CliError, match="returned int"):
        load_model("my_models:not_a_model")


def test_hf_config_directory(capsys, tmp_path):
    from fxpeft.zoo import tiny_llama

    tiny_llama(layers=1).model.config.save_pretrained(tmp_path / "cfg")
    code, out, _ = run(capsys, "inspect", str(tmp_path / "cfg"), "--json")
    assert code == 0
    names = [r["name"] for r in json.loads(out)]
    assert "model.layers.0.self_attn.q_proj" in names and names[-1] == "lm_head"
    assert [r["name"] for r in json.loads(out) if r["output_head"]] == ["lm_head"]
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "inspect", str(tmp_path / "empty"))
    assert code == 2 and "no config.json" in err


def test_parse_adapter_spec():
    c = parse_adapter_spec("r=16, alpha=32, dropout=0.1, target=q_proj, v_proj, exclude=lm_head, rslora=true", "lora")
    assert (c.r, c.lora_alpha, c.lora_dropout, c.use_rslora) == (16, 32, 0.1, True)
    assert c.target_modules == ["q_proj", "v_proj"] and c.exclude_modules == ["lm_head"]
    assert parse_adapter_spec("target=all-linear", "lora").target_modules == "all-linear"
    assert parse_adapter_spec(r"target=re:.*\.(q|v)_proj", "lora").target_modules == r".*\.(q|v)_proj"
    assert parse_adapter_spec("init=gaussian", "lora").init_lora_weights == "gaussian"
    ia3 = parse_adapter_spec("target=k_proj,v_proj,down_proj,ff=down_proj,init=false", "ia3")
    assert isinstance(ia3, fxpeft.IA3Config)
    assert ia3.target_modules == ["k_proj", "v_proj", "down_proj"] and ia3.feedforward_modules == ["down_proj"]
    assert ia3.init_ia3_weights is False
    with pytest.raises(CliError, match="rank_pattern=KEY:VALUE"):  # a dict field takes KEY:VALUE items
        parse_adapter_spec("rank_pattern=8", "lora")
    c = parse_adapter_spec("rank_pattern=q_proj:4,v_proj:2,alpha_pattern=q_proj:0.5", "lora")
    assert c.rank_pattern == {"q_proj": 4, "v_proj": 2} and c.alpha_pattern == {"q_proj": 0.5}
    assert parse_adapter_spec("lora_alpha=2.5,use_rslora=off", "lora").lora_alpha == 2.5
    assert parse_adapter_spec("init=false", "lora").init_lora_weights is False
    assert parse_adapter_spec("ff=re:.*down", "ia3").feedforward_modules == ".*down"
    for bad, needle in [("alpha=nan", "not a finite number"), ("alpha=inf", "not a finite number"),
                        ("alpha_pattern=q:-inf", "not a finite number"), ("dropout=1e999", "not a finite number"),
                        ("r=0", "r"), ("r=1.5", "expected int"), ("use_rslora=maybe", "expected bool"),
                        ("alpha=16,bogus=1", "unknown key 'bogus'"), ("ff=x", "unknown key 'ff'")]:
        with pytest.raises(CliError, match=needle):
            parse_adapter_spec(bad, "lora")
    with pytest.raises(CliError, match="unknown PEFT method 'nope'"):
        parse_adapter_spec("r=1", "nope")


# ---------------------------------------------------------------------------------------------------------
# every bad input: one line on stderr, a non-zero status, no traceback
# ---------------------------------------------------------------------------------------------------------

_BAD_MODELS = textwrap.dedent("""
    from torch import nn

    def boom():
        raise RuntimeError("weights went missing\\nsecond line")

    def number():
        return 3

    def takes_one(n):
        return nn.Linear(n, n)
""")
_SVG = ["--out", "{tmp}/x.svg"]

BAD_INPUTS = [  # (argv, exit status, what stderr must say)
    (["draw", "fxpeft.zoo:cnn", *_SVG, "--bitfit", "r=1"], 2, "unrecognized arguments: --bitfit"),
    (["draw", "fxpeft.zoo:cnn", *_SVG, "--lora", "rank=8"], 2, "unknown key 'rank'"),
    (["draw", "fxpeft.zoo:cnn", *_SVG, "--lora", "alpha=nan"], 2, "alpha='nan' is not a finite number"),
    (["draw", "fxpeft.zoo:cnn", *_SVG, "--lora", "alpha=-inf"], 2, "not a finite number"),
    (["draw", "fxpeft.zoo:cnn", *_SVG, "--lora", "r=0"], 2, "--lora:"),
    (["draw", "fxpeft.zoo:cnn", *_SVG, "--lora", "r=x"], 2, "r='x' is not a valid value"),
    (["draw", "fxpeft.zoo:cnn", *_SVG, "--ia3", "init=sometimes"], 2, "init='sometimes'"),
    (["draw", "fxpeft.zoo:cnn", *_SVG, "--lora", "target=nothing_here"], 1, "matches no targetable site"),
    (["inspect", "cli_bad_models:boom"], 1, "RuntimeError: weights went missing"),
    (["inspect", "cli_bad_models:number"], 2, "returned int"),
    (["inspect", "cli_bad_models:takes_one(1, 2)"], 2, "cannot call takes_one(...)"),
    (["inspect", "cli_bad_import:fn"], 1, "importing 'cli_bad_import' raised ZeroDivisionError"),
    (["inspect", "no_such_module_anywhere:fn"], 2, "cannot import module"),
    (["draw", "fxpeft.zoo:cnn", "--out", "{tmp}/a_file/x.svg"], 1, "is not a directory"),
    (["draw", "fxpeft.zoo:cnn", "--out", "{tmp}/a_dir.svg"], 1, "is a directory"),
    (["draw", "fxpeft.zoo:cnn", *_SVG, "--depth", "deep"], 2, "expected an integer, 'auto' or 'all'"),
    (["draw", "fxpeft.zoo:cnn", *_SVG, "--depth", "-1"], 2, "depth must be >= 0"),
    (["inspect", "{tmp}/missing/model"], 2, "no such directory"),
    (["inspect", "{tmp}/empty_dir"], 2, "no config.json"),
    (["inspect", "fxpeft.zoo:cnn", "--kind", "attention"], 2, "invalid choice: 'attention'"),
]


@pytest.fixture
def bad_inputs_dir(tmp_path, monkeypatch):
    (tmp_path / "cli_bad_models.py").write_text(_BAD_MODELS)
    (tmp_path / "cli_bad_import.py").write_text("x = 1 / 0\n")
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "a_dir.svg").mkdir()
    (tmp_path / "empty_dir").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("argv, status, needle", BAD_INPUTS, ids=[" ".join(r[0][:1] + r[0][-2:]) for r in BAD_INPUTS])
def test_bad_inputs_fail_with_one_line_and_no_traceback(argv, status, needle, bad_inputs_dir, capsys):
    argv = [a.replace("{tmp}", str(bad_inputs_dir)) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == status
    assert err.startswith(f"fxpeft {argv[0]}: error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err
    assert not list(bad_inputs_dir.glob("x.*"))  # nothing half-written


def test_debug_prints_the_traceback_then_the_error_line(bad_inputs_dir, capsys):
    for argv in (["--debug", "inspect", "cli_bad_models:boom"], ["inspect", "cli_bad_models:boom", "--debug"]):
        code, _, err = run(capsys, *argv)
        assert code == 1
        assert err.startswith("Traceback") and "weights went missing" in err  # the factory's own frame
        assert err.splitlines()[-1].startswith("fxpeft inspect: error: MODEL 'cli_bad_models:boom'")


def test_unexpected_errors_and_write_failures_are_one_line(capsys, tmp_path, monkeypatch):
    def fail(exc):
        def draw(*args, **kwargs):
            raise exc
        return draw

    monkeypatch.setattr(fxpeft, "draw", fail(PermissionError(13, "Permission denied")))
    code, _, err = run(capsys, "draw", "fxpeft.zoo:cnn", "--out", str(tmp_path / "x.dot"))
    assert (code, err.count("\n")) == (1, 1)
    assert err.startswith("fxpeft draw: error: --out") and "Permission denied" in err
    monkeypatch.setattr(fxpeft, "draw", fail(KeyError("bug")))  # a bug: still one line, and how to see more
    code, _, err = run(capsys, "draw", "fxpeft.zoo:cnn", "--out", str(tmp_path / "x.dot"))
    assert (code, err.count("\n")) == (1, 1)
    assert "unexpected KeyError: 'bug'" in err and "--debug" in err and "Traceback" not in err


def test_no_fuse_is_passed_to_every_method(capsys, tmp_path, monkeypatch):
    calls = []
    rewrite = fxpeft.rewrite

    def spy(gm, config, adapter_name="default", **kwargs):
        calls.append((type(config).__name__, adapter_name, kwargs))
        return rewrite(gm, config, adapter_name, **kwargs)

    monkeypatch.setattr(fxpeft, "rewrite", spy)
    argv = ["draw", "fxpeft.zoo:cnn", "--out", str(tmp_path / "x.dot"), "--ia3", "target=conv1", "--lora", "target=fc"]
    assert run(capsys, *argv, "--no-fuse")[0] == 0
    assert calls == [("IA3Config", "ia30", {"fuse": False}), ("LoraConfig", "lora1", {"fuse": False})]
    calls.clear()
    assert run(capsys, *argv)[0] == 0
    assert [c[2] for c in calls] == [{"fuse": True}, {"fuse": True}]
