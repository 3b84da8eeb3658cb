"""Bad input, table-driven: every row raises a typed fxpeft error (never TypeError, IndexError, re.error or
RecursionError) and leaves the graph unchanged. Rows cover the API, adapter files and the CLI."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import assert_unchanged, snapshot
from safetensors.torch import load_file, save_file

import fxpeft
from fxpeft import zoo

EVIL = r"([\w.]|[\w.])*!"  # exponential for a backtracking engine on long module names


@pytest.fixture(scope="module")
def llama():
    model, args, kwargs = zoo.tiny_llama(layers=1)
    return fxpeft.trace(model, args, kwargs)


L, I = fxpeft.LoraConfig, fxpeft.IA3Config
API_ROWS = [
    ("r=0", lambda: L(r=0, target_modules=["q_proj"]), fxpeft.ConfigError, "r must be"),
    ("r as a string", lambda: L(r="8", target_modules=["q_proj"]), fxpeft.ConfigError, "r must be"),
    ("NaN lora_alpha", lambda: L(lora_alpha=math.nan, target_modules=["q_proj"]), fxpeft.ConfigError, "lora_alpha"),
    ("NaN alpha_pattern", lambda: L(alpha_pattern={"q_proj": math.nan}, target_modules=["q_proj"]),
     fxpeft.ConfigError, "alpha_pattern"),
    ("zero rank_pattern", lambda: L(rank_pattern={"q_proj": 0}, target_modules=["q_proj"]), fxpeft.ConfigError,
     "rank_pattern"),
    ("bad regex rank_pattern key", lambda: L(rank_pattern={"(": 4}, target_modules=["q_proj"]), fxpeft.ConfigError,
     "rank_pattern"),
    ("lora_dropout='x'", lambda: L(lora_dropout="x", target_modules=["q_proj"]), fxpeft.ConfigError, "lora_dropout"),
    ("lora_dropout=1", lambda: L(lora_dropout=1.0, target_modules=["q_proj"]), fxpeft.ConfigError, "lora_dropout"),
    ("use_rslora='false'", lambda: L(use_rslora="false", target_modules=["q_proj"]), fxpeft.ConfigError, "use_rslora"),
    ("init pisa", lambda: L(init_lora_weights="pisa", target_modules=["q_proj"]), fxpeft.ConfigError, "init_lora"),
    ("use_dora='yes'", lambda: L(use_dora="yes", target_modules=["q_proj"]), fxpeft.ConfigError, "use_dora"),
    ("bias=everything", lambda: L(bias="everything", target_modules=["q_proj"]), fxpeft.ConfigError, "bias"),
    ("lora_bias='yes'", lambda: L(lora_bias="yes", target_modules=["q_proj"]), fxpeft.ConfigError, "lora_bias"),
    ("target_modules=5", lambda: L(target_modules=5), fxpeft.TargetError, "target_modules"),
    ("exclude_modules=7", lambda: L(target_modules=["q_proj"], exclude_modules=7), fxpeft.TargetError, "exclude"),
    ("empty target list", lambda: L(target_modules=[]), fxpeft.TargetError, "empty"),
    ("unknown target", lambda: L(target_modules=["q_prj"]), fxpeft.TargetError, "q_proj"),
    ("regex that does not compile", lambda: L(target_modules="(q_proj"), fxpeft.ConfigError, "target_modules"),
    ("lookahead regex", lambda: L(target_modules="^(?!.*lm_head).*"), fxpeft.ConfigError, "look"),
    ("exponential regex", lambda: L(target_modules=EVIL), fxpeft.TargetError, "matches no"),
    ("IA3 feedforward_modules=5", lambda: I(target_modules=["down_proj"], feedforward_modules=5), fxpeft.ConfigError,
     "feedforward"),
    ("IA3 feedforward not in targets", lambda: I(target_modules=["k_proj"], feedforward_modules=["down_proj"]),
     fxpeft.ConfigError, "feedforward"),
    ("IA3 init='yes'", lambda: I(target_modules=["k_proj"], init_ia3_weights="yes"), fxpeft.ConfigError, "init_ia3"),
    ("IA3 on an embedding", lambda: I(target_modules=["embed_tokens"]), fxpeft.UnsupportedSiteError, "embedding"),
    ("a dict as config", lambda: {"r": 8}, fxpeft.ConfigError, "registered method config"),
]


@pytest.mark.parametrize("make,error,match", [r[1:] for r in API_ROWS], ids=[r[0] for r in API_ROWS])
def test_bad_config_through_rewrite(llama, make, error, match):
    gm = copy.deepcopy(llama)
    snap = snapshot(gm)
    with pytest.raises(error, match=match):
        fxpeft.rewrite(gm, make())
    assert_unchanged(gm, snap)


def test_bad_calls_are_typed(llama):
    gm = fxpeft.rewrite(copy.deepcopy(llama), L(r=4, target_modules=["q_proj"]))
    snap = snapshot(gm)
    for call, error in [
        (lambda: fxpeft.rewrite(gm, L(target_modules=["q_proj"])), fxpeft.AdapterExistsError),
        (lambda: fxpeft.rewrite(gm, L(target_modules=["v_proj"]), adapter_name=""), fxpeft.ConfigError),
        (lambda: fxpeft.rewrite(gm, L(target_modules=["v_proj"]), adapter_name="a b"), fxpeft.ConfigError),
        (lambda: fxpeft.rewrite(gm, L(target_modules=["v_proj"]), adapter_name=3), fxpeft.ConfigError),
        (lambda: fxpeft.merge(gm, ["nme"]), fxpeft.ConfigError),
        (lambda: fxpeft.save_adapter(gm, "/proc/no/such/dir"), fxpeft.AdapterFileError),
        (lambda: fxpeft.save_adapter(gm, "/tmp", adapter_name="nme"), fxpeft.AdapterFileError),
        (lambda: fxpeft.rewrite(torch.nn.Linear(2, 2), L(target_modules=["q_proj"])), fxpeft.ConfigError),
        (lambda: fxpeft.trace("not a module"), fxpeft.TraceError),
        (lambda: fxpeft.draw(gm, "/tmp/graph.xyz"), fxpeft.DrawError),
    ]:
        with pytest.raises(error):
            call()
        assert_unchanged(gm, snap)


# ---------------------------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory):
    gm = fxpeft.rewrite(copy.deepcopy(llama), L(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    d = tmp_path_factory.mktemp("adapter")
    fxpeft.save_adapter(gm, d)
    return d


def _deep(n: int) -> str:
    return "[" * n + "]" * n


FILE_ROWS = [
    ("use_rslora as a string", {"use_rslora": "false"}, "use_rslora"),
    ("lora_dropout='x'", {"lora_dropout": "x"}, "lora_dropout"),
    ("target_modules=5", {"target_modules": 5}, "target_modules"),
    ("bad regex rank_pattern key", {"rank_pattern": {"(": 4}}, "rank_pattern"),
    ("exponential target regex", {"target_modules": EVIL}, "matches no"),
    ("exponential rank_pattern key", {"rank_pattern": {EVIL: 4}}, None),
    ("NaN lora_alpha", {"lora_alpha": math.nan}, "lora_alpha"),
    ("r=-1", {"r": -1}, "r must be"),
    ("unknown peft_type", {"peft_type": "FOO"}, "peft_type"),
    ("layers_to_transform out of range", {"layers_to_transform": 7}, "layers_to_transform"),
    ("layers_to_transform as a string", {"layers_to_transform": "0"}, "layers_to_transform"),
    ("use_dora as a string", {"use_dora": "true"}, "use_dora"),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ("LoftQ init", {"init_lora_weights": "loftq"}, "loftq"),
    ("nested JSON", "DEEP", "nest|deep"),
    ("JSON list", "LIST", "object"),
    ("not JSON", "GARBAGE", "JSON"),
]


@pytest.mark.parametrize("change,match", [r[1:] for r in FILE_ROWS], ids=[r[0] for r in FILE_ROWS])
def test_untrusted_adapter_config(llama, saved, tmp_path, change, match):
    config = json.loads((saved / "adapter_config.json").read_text())
    if change == "DEEP":
        text = '{"peft_type": "LORA", "x": ' + _deep(100_000) + "}"
    elif change == "LIST":
        text = "[1, 2]"
    elif change == "GARBAGE":
        text = "{not json"
    else:
        text = json.dumps({**config, **change})
    (tmp_path / "adapter_config.json").write_text(text)
    (tmp_path / "adapter_model.safetensors").write_bytes((saved / "adapter_model.safetensors").read_bytes())
    gm = copy.deepcopy(llama)
    snap = snapshot(gm)
    if match is None:  # valid (the key matches no module, as in PEFT), and decided in linear time
        fxpeft.load_adapter(gm, tmp_path)
        assert len(fxpeft.adapters(gm)) == 2
        return
    with pytest.raises(fxpeft.AdapterFileError, match=re.compile(match, re.I)):
        fxpeft.load_adapter(gm, tmp_path)
    assert_unchanged(gm, snap)


@pytest.mark.parametrize("damage", ["nan", "inf", "truncated", "missing key"])
def test_damaged_tensors(llama, saved, tmp_path, damage):
    (tmp_path / "adapter_config.json").write_bytes((saved / "adapter_config.json").read_bytes())
    tensors = load_file(saved / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    path = tmp_path / "adapter_model.safetensors"
    if damage in ("nan", "inf"):
        tensors[key][0, 0] = math.nan if damage == "nan" else math.inf
        save_file(tensors, path)
    elif damage == "truncated":
        data = (saved / "adapter_model.safetensors").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        del tensors[key]
        save_file(tensors, path)
    gm = copy.deepcopy(llama)
    snap = snapshot(gm)
    with pytest.raises(fxpeft.AdapterFileError):
        fxpeft.load_adapter(gm, tmp_path)
    assert_unchanged(gm, snap)


# ------------------------------------------------------------------------------------------------ CLI

CLI_ROWS = [
    ["inspect", "no_such_module_xyz:factory"],
    ["inspect", "fxpeft.zoo:no_such_factory"],
    ["draw", "fxpeft.zoo:cnn", "--out", "/tmp/x.svg", "--lora", "alpha=nan,target=fc"],
    ["draw", "fxpeft.zoo:cnn", "--out", "/tmp/x.svg", "--lora", "r=0,target=fc"],
    ["draw", "fxpeft.zoo:cnn", "--out", "/proc/no/such/dir/x.svg", "--lora", "target=fc"],
]


@pytest.mark.parametrize("argv", CLI_ROWS, ids=[" ".join(a[:2]) + " " + a[-1] for a in CLI_ROWS])
def test_cli_errors_are_one_line(argv):
    proc = subprocess.run([sys.executable, "-m", "fxpeft.cli", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert len([ln for ln in lines if "error:" in ln]) == 1 and lines[-1].startswith(f"fxpeft {argv[0]}: error:")
