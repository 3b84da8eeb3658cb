"""The ``fxpeft`` command line: inspect, draw, demo; MODEL resolution; --lora/--ia3 specs; error handling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import fxpeft
import fxpeft.zoo
from fxpeft.cli import CliError, build_parser, load_model, main, parse_adapter_spec
from fxpeft.viz import METHOD_COLORS, _REMOVED

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
REPO = Path(__file__).resolve().parents[1]


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
        assert "--lora" in text and "--diff" in text and "apt-get install graphviz" in text


def test_inspect_lists_sites_with_kind_and_shape(capsys):
    code, out, _ = run(capsys, "inspect", "fxpeft.zoo:cnn")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:6]}
    assert rows["conv1"][1:4] == ["conv", "Conv2d", "16×3×3×3"]
    assert rows["fc"][1:4] == ["linear", "Linear", "10×32"] and "output head" in " ".join(rows["fc"])
    assert "torch.export" in out.splitlines()[0] and "4 targetable sites" in out.splitlines()[0]
    assert "--lora r=8,target=" in out
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
    assert METHOD_COLORS["lora"][0] in out.read_text()


def test_draw_merge_diff_to_dot(capsys, tmp_path):
    out = tmp_path / "merge.dot"
    code, _, _ = run(capsys, "draw", "fxpeft.zoo:cnn", "--out", str(out), "--lora", "target=conv1,conv2",
                     "--merge", "--diff", "--depth", "all")
    assert code == 0
    src = out.read_text()
    # What the command merged away is what the same rewrite through the API inserts.
    ex = fxpeft.zoo.cnn()
    gm = fxpeft.rewrite(fxpeft.trace(ex.model, ex.args), fxpeft.LoraConfig(target_modules=["conv1", "conv2"]))
    tagged = [n for n in gm.graph.nodes if "fxpeft" in n.meta]
    assert f"diff: +0 / −{len(tagged)} FX nodes" in src
    removed = {line.split('"')[1] for line in src.splitlines()
               if _REMOVED in line and "dashed" in line and "->" not in line and "legend" not in line}
    assert removed == {n.name for n in tagged if n.op != "get_attr"}  # weight reads are not drawn
    assert sum(n.meta["fxpeft"]["role"] == "out" for n in tagged) == 2


def test_draw_ia3_and_lora_and_factory_arguments(capsys, tmp_path):
    out = tmp_path / "f.dot"
    code, _, _ = run(capsys, "draw", "fxpeft.zoo:functional_lm(seed=1)", "--out", str(out),
                     "--lora", "r=2,alpha=4,target=w_in", "--ia3", "target=w_out", "--no-fold")
    assert code == 0
    src = out.read_text()
    assert METHOD_COLORS["lora"][0] in src and METHOD_COLORS["ia3"][0] in src
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
    with pytest.raises(CliError, match="rank_pattern"):  # dict fields have no key=value spelling
        parse_adapter_spec("rank_pattern=8", "lora")
