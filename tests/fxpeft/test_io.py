"""Adapter files in PEFT's format, both ways, against the real ``peft`` package; merged checkpoints; reliability."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from conftest import (
    assert_unchanged,
    out_tensor,
    rel_err,
    snapshot,
)
from conftest import (
    run_model as _run_model,
)
from conftest import (
    traced_base as _base,
)
from conftest import (
    traced_copy as _graph,
)
from safetensors.torch import load_file, save_file

import fxpeft
from fxpeft import zoo
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # deepcopy of an export graph

@torch.no_grad()
def _run(gm, name: str) -> torch.Tensor:
    _, args, kwargs, _ = _base(name)
    gm.eval()
    return out_tensor(gm(*args, **{k: v for k, v in kwargs.items() if k != "use_cache"}))


def _adapter_state(gm, adapter_name="default") -> dict[str, torch.Tensor]:
    return {f"{m.site_name}.{p}": t for m in gm.modules() if isinstance(m, fxpeft.AdapterModule)
            and m.adapter_name == adapter_name for p, t in m.named_parameters()}


@dataclass
class Case:
    id: str
    base: str
    config: Callable


def _lora(**kw):
    import peft

    return lambda: peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)


def _ia3(**kw):
    import peft

    return lambda: peft.IA3Config(init_ia3_weights=False, **kw)


CASES = [
    Case("llama-7-projections", "llama", _lora(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])),
    Case("llama-embedding-rslora-patterns", "llama", _lora(
        target_modules=["embed_tokens", "q_proj", "v_proj"], use_rslora=True,
        rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6}, alpha_pattern={"embed_tokens": 3, "v_proj": 5})),
    Case("llama-regex-exclude", "llama", _lora(target_modules=r".*\.(q_proj|v_proj|down_proj)",
                                               exclude_modules=["layers.0.self_attn.v_proj"])),
    Case("gpt2-conv1d", "gpt2", _lora(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    Case("gpt2-tied-embedding", "gpt2", _lora(target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    Case("bert-query-value", "bert", _lora(target_modules=["query", "value"])),
    Case("cnn-conv", "cnn", _lora(target_modules=["conv1", "conv3", "fc"])),
    Case("llama-ia3", "llama", _ia3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    Case("gpt2-ia3", "gpt2", _ia3(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
    Case("cnn-ia3", "cnn", _ia3(target_modules=["conv1", "conv3"], feedforward_modules=["conv3"])),
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_and_fxpeft_adapter_files_are_interchangeable(case, tmp_path):
    import peft

    model = _base(case.base)[0]
    pm = peft.get_peft_model(copy.deepcopy(model), case.config())  # PEFT mutates the model it wraps
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = _run_model(pm, case.base)
    assert rel_err(ref, _run_model(model, case.base)) > 1e-2  # the adapter really changes the outputs

    # PEFT -> fxpeft
    gm = fxpeft.load_adapter(_graph(case.base), tmp_path / "peft")
    got = _run(gm, case.base)
    assert rel_err(got, ref) <= 1e-5

    # fxpeft -> PEFT
    fxpeft.save_adapter(gm, tmp_path / "fx")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    assert rel_err(_run_model(pm2, case.base), got) <= 1e-5

    # the same tensors, under the same keys, as PEFT's own file (PEFT also keeps a targeted embedding's base weight)
    ours, theirs = load_file(tmp_path / "fx" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert ours.keys() == {k for k in theirs if not k.endswith(".base_layer.weight")}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    # fxpeft -> fxpeft is bit-exact
    again = fxpeft.load_adapter(_graph(case.base), tmp_path / "fx")
    assert torch.equal(_run(again, case.base), got)
    a, b = _adapter_state(gm), _adapter_state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fxpeft_trained_adapter_with_per_site_ranks_loads_in_peft(tmp_path):
    import peft

    gm = fxpeft.rewrite(_graph("llama"), fxpeft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", rank_pattern={"down_proj": 2},
        alpha_pattern={"o_proj": 4}))
    _, args, kwargs, _ = _base("llama")
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    gm.train()
    for _ in range(3):
        loss = gm(input_ids=kwargs["input_ids"]).logits.logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    fxpeft.save_adapter(gm, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16, 0.1)
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    assert config["rank_pattern"] == {"down_proj": 2} and config["alpha_pattern"] == {"o_proj": 4}

    model = _base("llama")[0]
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    got = _run(gm, "llama")
    assert rel_err(got, _run_model(model, "llama")) > 1e-3
    assert rel_err(_run_model(pm, "llama"), got) <= 1e-5


@pytest.mark.filterwarnings("ignore")
def test_peft_saved_base_embedding_weights_are_loaded_as_peft_does(tmp_path):
    import peft

    model = _base("llama")[0]
    pm = peft.get_peft_model(copy.deepcopy(model), _lora(target_modules=["embed_tokens", "q_proj"])())
    pm.save_pretrained(str(tmp_path))
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key] + 0.5 * torch.randn_like(tensors[key])  # an embedding trained alongside
    save_file(tensors, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    ref = _run_model(peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)), "llama")
    with pytest.warns(UserWarning, match="base weights"):
        gm = fxpeft.load_adapter(_graph("llama"), tmp_path)
    assert rel_err(_run(gm, "llama"), ref) <= 1e-5


@pytest.mark.filterwarnings("ignore")
def test_symbolic_trace_graph_loads_peft_conv_adapter(tmp_path):
    import peft

    model = _base("cnn")[0]
    pm = peft.get_peft_model(copy.deepcopy(model), _lora(target_modules=["conv1", "conv3", "fc"])())
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(copy.deepcopy(model)), tmp_path)  # fx dialect: no example inputs
    assert rel_err(_run(gm, "cnn"), _run_model(pm, "cnn")) <= 1e-5


def test_dilated_conv_lora_round_trips_and_warns_about_peft(tmp_path):
    gm = fxpeft.rewrite(_graph("cnn"), fxpeft.LoraConfig(r=2, target_modules=["conv2"], init_lora_weights=False))
    with pytest.warns(UserWarning, match="dilation"):
        fxpeft.save_adapter(gm, tmp_path)
    with pytest.warns(UserWarning, match="dilation"):
        again = fxpeft.load_adapter(_graph("cnn"), tmp_path)
    assert torch.equal(_run(again, "cnn"), _run(gm, "cnn"))


def test_named_adapters_are_saved_one_at_a_time(tmp_path):
    gm = _graph("bert")
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False), "first")
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=3, target_modules=["query", "value"], init_lora_weights=False), "second")
    fxpeft.save_adapter(gm, tmp_path / "second", adapter_name="second")
    config = json.loads((tmp_path / "second" / CONFIG_NAME).read_text())
    assert config["r"] == 3 and sorted(config["target_modules"]) == ["query", "value"]
    again = fxpeft.load_adapter(_graph("bert"), tmp_path / "second", adapter_name="other")
    mine, theirs = _adapter_state(gm, "second"), _adapter_state(again, "other")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(fxpeft.AdapterFileError, match="no adapter named 'third'"):
        fxpeft.save_adapter(gm, tmp_path / "x", adapter_name="third")


# ------------------------------------------------------------------------------------------ merged checkpoints


def _merged(name: str, targets: list[str]):
    gm = fxpeft.rewrite(_graph(name), fxpeft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    want = _run(gm, name)
    return fxpeft.merge(gm), want


def test_save_merged_sharded_reloads_in_its_transformers_class(tmp_path):
    from transformers import LlamaForCausalLM

    model = _base("llama")[0]
    merged, want = _merged("llama", ["q_proj", "down_proj"])
    files = fxpeft.save_merged(merged, tmp_path, max_shard_size="40KB", config=model.config)
    assert len(files) > 1 and all(f.startswith("model-") for f in files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(files)
    shards = {f: load_file(tmp_path / f) for f in files}
    assert all(os.path.getsize(tmp_path / f) < 40_000 + 4096 or len(s) == 1 for f, s in shards.items())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for s in shards.values()
                                                  for t in s.values())

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert rel_err(_run_model(reloaded, "llama"), want) <= 1e-5
    fresh = LlamaForCausalLM(model.config)
    fresh.load_state_dict({k: v for s in shards.values() for k, v in s.items()}, strict=True)
    assert rel_err(_run_model(fresh, "llama"), want) <= 1e-5

    # a later, unsharded save replaces the shards and their index
    assert fxpeft.save_merged(merged, tmp_path) == ["model.safetensors"]
    # (fxpeft's own bookkeeping, .fxpeft-manifest.json and .fxpeft.lock, is hidden and not part of the checkpoint)
    assert sorted(f for f in os.listdir(tmp_path) if not f.startswith(".")) == ["config.json", "model.safetensors"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".fxpeft-tmp-")]


@pytest.mark.filterwarnings("ignore:merge")
@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "lm_head"]], ids=["tied", "head-untied-by-merge"])
def test_save_merged_tied_weights(targets, tmp_path):
    from transformers import GPT2LMHeadModel

    model = _base("gpt2")[0]
    merged, want = _merged("gpt2", targets)
    if "lm_head" in targets:
        with pytest.warns(UserWarning, match="tie_word_embeddings=False"):
            fxpeft.save_merged(merged, tmp_path, config=model.config)
    else:
        fxpeft.save_merged(merged, tmp_path, config=model.config)
    keys = set(load_file(tmp_path / "model.safetensors"))
    # HF writes a tied weight once, under the input embedding's name
    assert ("lm_head.weight" in keys) == ("lm_head" in targets) and "transformer.wte.weight" in keys
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert rel_err(_run_model(GPT2LMHeadModel.from_pretrained(tmp_path), "gpt2"), want) <= 1e-5
    assert model.config.tie_word_embeddings  # the caller's config is not changed


def test_save_merged_cnn_keeps_buffers_and_refuses_unmerged(tmp_path):
    merged, want = _merged("cnn", ["conv1", "fc"])
    fxpeft.save_merged(merged, tmp_path)
    fresh = zoo.SmallCNN().eval()
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)  # incl. batch-norm statistics
    assert rel_err(_run_model(fresh, "cnn"), want) <= 1e-5
    gm = fxpeft.rewrite(_graph("cnn"), fxpeft.LoraConfig(r=2, target_modules=["fc"]))
    with pytest.raises(fxpeft.AdapterFileError, match="merge"):
        fxpeft.save_merged(gm, tmp_path / "x")
    with pytest.raises(fxpeft.AdapterFileError, match="max_shard_size"):
        fxpeft.save_merged(merged, tmp_path / "x", max_shard_size="lots")


# ------------------------------------------------------------------------------------------------ reliability


def _files(directory) -> dict[str, bytes]:
    return {f: (directory / f).read_bytes() for f in sorted(os.listdir(directory))}


def _failing_save_file(calls_before_failure: int = 0):
    """A safetensors writer that writes half a file, then fails (a full disk, a kill)."""
    count = {"n": 0}

    def fail(tensors, path, metadata=None):
        if count["n"] >= calls_before_failure:
            with open(path, "wb") as f:
                f.write(b"\x00" * 17)
            raise OSError("No space left on device")
        count["n"] += 1
        save_file(tensors, path, metadata=metadata)

    return fail


@pytest.mark.parametrize("stage", ["weights", "config"])
def test_save_adapter_is_atomic(stage, tmp_path, monkeypatch):
    gm = fxpeft.rewrite(_graph("bert"), fxpeft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    fxpeft.save_adapter(gm, tmp_path)
    before = _files(tmp_path)
    with torch.no_grad():
        for m in fxpeft.adapters(gm).values():
            m.B.add_(1.0)
    if stage == "weights":
        monkeypatch.setattr("fxpeft.io.save_file", _failing_save_file())
    else:
        def fail(fd):
            raise OSError("killed")

        monkeypatch.setattr("fxpeft.io.os.fsync", fail)
    # a typed error that names the cause (the OSError is chained)
    with pytest.raises(fxpeft.AdapterFileError, match="No space left on device" if stage == "weights" else "killed") as e:
        fxpeft.save_adapter(gm, tmp_path)
    assert isinstance(e.value.__cause__ or e.value.__context__, OSError)
    assert _files(tmp_path) == before  # the previous files intact, no temporary left behind


def test_save_merged_is_atomic(tmp_path, monkeypatch):
    merged, _ = _merged("cnn", ["conv1"])
    fxpeft.save_merged(merged, tmp_path, max_shard_size=4096)
    before = _files(tmp_path)
    assert len(before) > 2
    with torch.no_grad():
        merged.get_parameter("fc.weight").mul_(2)
    monkeypatch.setattr("fxpeft.io.save_file", _failing_save_file(calls_before_failure=2))
    with pytest.raises(fxpeft.AdapterFileError, match="No space left on device") as e:
        fxpeft.save_merged(merged, tmp_path, max_shard_size=4096)
    assert isinstance(e.value.__cause__ or e.value.__context__, OSError)
    assert _files(tmp_path) == before


def _edit_config(**fields):
    def edit(d):
        config = json.loads((d / CONFIG_NAME).read_text())
        config.update(fields)
        (d / CONFIG_NAME).write_text(json.dumps(config))

    return edit


def _edit_tensors(fn):
    def edit(d):
        tensors = load_file(d / WEIGHTS_NAME)
        fn(tensors)
        save_file(tensors, d / WEIGHTS_NAME)

    return edit


_Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _truncate(d):
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _only_bin(d):
    tensors = load_file(d / WEIGHTS_NAME)
    os.unlink(d / WEIGHTS_NAME)
    torch.save(tensors, d / "adapter_model.bin")


BREAKERS = {
    "missing-key": (_edit_tensors(lambda t: t.pop(f"{_Q0}.lora_B.weight")), r"missing key.*q_proj\.lora_B"),
    "unexpected-key": (_edit_tensors(lambda t: t.update({f"{_Q0.replace('q_proj', 'k_proj')}.lora_A.weight":
                                                         torch.zeros(4, 64)})), r"unexpected key.*k_proj"),
    "shape-mismatch": (_edit_tensors(lambda t: t.update({f"{_Q0}.lora_A.weight": torch.zeros(4, 65)})),
                       r"shape mismatch.*q_proj\.lora_A\.weight: file \(4, 65\), graph expects \(4, 64\)"),
    "rank-differs-from-config": (_edit_config(r=8), r"shape mismatch.*graph expects \(8, 64\)"),
    "truncated-safetensors": (_truncate, "truncated or corrupt"),
    "corrupt-safetensors": (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\xff" * 64), "truncated or corrupt"),
    "corrupt-config": (lambda d: (d / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": '), "not valid JSON"),
    "no-config": (lambda d: os.unlink(d / CONFIG_NAME), "no adapter_config.json"),
    "targets-missing-module": (_edit_config(target_modules=["q_proj", "v_proj", "qkv_proj"]),
                               r"another architecture.*'qkv_proj' matches no targetable site"),
    "unsupported-peft-type": (_edit_config(peft_type="VBLORA"), "unsupported peft_type 'VBLORA'"),
    "dora-without-magnitudes": (_edit_config(use_dora=True), r"missing key.*q_proj\.lora_magnitude_vector"),
    "lora-bias-without-tensors": (_edit_config(lora_bias=True), r"missing key.*lora_B\.bias"),
    "unknown-bias": (_edit_config(bias="some"), "bias='some' is not supported"),
    "modules-to-save-without-tensors": (_edit_config(modules_to_save=["lm_head"]), r"missing key.*lm_head\.weight"),
    "modules-to-save-nowhere": (_edit_config(modules_to_save=["no_such_head"]), "matches no module"),
    "layers-to-transform-drops-keys": (_edit_config(layers_to_transform=[0]), r"unexpected key.*layers\.1\."),
    "layers-out-of-range": (_edit_config(layers_to_transform=[7]), r"layers_to_transform \[7\] out of range"),
    "corda": (_edit_config(init_lora_weights="corda"), "corda"),
    "magnitudes-without-dora": (_edit_tensors(lambda t: t.update({f"{_Q0}.lora_magnitude_vector": torch.ones(64)})),
                                r"unexpected key.*q_proj\.lora_magnitude_vector"),
    "pickle-only": (_only_bin, "(?s)adapter_model.bin, a pickle.*safetensors"),
    # fxpeft's own save, changed afterwards: its manifest no longer matches
    "edited-after-fxpeft-save": (_edit_config(r=8), "two different saves"),
}


@pytest.mark.parametrize("breaker", list(BREAKERS))
def test_load_errors_are_clear_and_leave_the_graph_unchanged(breaker, tmp_path):
    from fxpeft.atomic import MANIFEST_NAME

    src = fxpeft.rewrite(_graph("llama"), fxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fxpeft.save_adapter(src, tmp_path)
    if breaker != "edited-after-fxpeft-save":
        os.unlink(tmp_path / MANIFEST_NAME)  # files as another tool (PEFT, a download) leaves them: no manifest
    edit, message = BREAKERS[breaker]
    edit(tmp_path)
    gm = _graph("llama")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.AdapterFileError, match=message):
        fxpeft.load_adapter(gm, tmp_path)
    assert_unchanged(gm, snap)


@pytest.mark.filterwarnings("ignore")
def test_wrong_architecture_and_existing_adapter_leave_the_graph_unchanged(tmp_path):
    src = fxpeft.rewrite(_graph("llama"), fxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fxpeft.save_adapter(src, tmp_path)
    gpt2 = _graph("gpt2")
    snap = snapshot(gpt2)
    with pytest.raises(fxpeft.AdapterFileError, match="another architecture"):
        fxpeft.load_adapter(gpt2, tmp_path)
    assert_unchanged(gpt2, snap)

    model, args, kwargs = zoo.tiny_llama(hidden=32)  # same family, other size
    small = fxpeft.trace(model, args, kwargs)
    snap = snapshot(small)
    with pytest.raises(fxpeft.AdapterFileError, match="shape mismatch"):
        fxpeft.load_adapter(small, tmp_path)
    assert_unchanged(small, snap)

    gm = fxpeft.load_adapter(_graph("llama"), tmp_path)
    snap = snapshot(gm)
    with pytest.raises(fxpeft.AdapterExistsError):
        fxpeft.load_adapter(gm, tmp_path)
    assert_unchanged(gm, snap)


@pytest.mark.filterwarnings("ignore")
def test_no_pickle_on_any_load_path(tmp_path, monkeypatch):
    import peft

    model = _base("gpt2")[0]
    pm = peft.get_peft_model(copy.deepcopy(model), _lora(target_modules=["wte", "c_attn"])())
    pm.save_pretrained(str(tmp_path / "peft"))

    calls = []

    def refuse(*a, **k):
        calls.append(a)  # recorded as well as raised: a broad ``except`` on a load path cannot hide it
        raise AssertionError("unpickling on a load path")

    for target in ("pickle.load", "pickle.loads", "torch.load"):
        monkeypatch.setattr(target, refuse)
    gm = fxpeft.load_adapter(_graph("gpt2"), tmp_path / "peft")
    fxpeft.save_adapter(gm, tmp_path / "fx")
    again = fxpeft.load_adapter(_graph("gpt2"), tmp_path / "fx")
    assert calls == []
    monkeypatch.undo()
    # the loads really loaded PEFT's adapter: both graphs compute what PEFT computes
    ref = _run_model(pm, "gpt2")
    assert rel_err(ref, _run_model(model, "gpt2")) > 1e-2
    assert rel_err(_run(gm, "gpt2"), ref) <= 1e-5
    assert torch.equal(_run(again, "gpt2"), _run(gm, "gpt2"))
