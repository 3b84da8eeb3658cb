"""fxpeft.distributed (adapter state dicts, DCP checkpoints, consolidation) and the streaming save_merged(merge=True).

One process here; the 2-process cases (gloo, ``fully_shard`` on the root) run in ONE spawn, marked heavy: save with
2 processes and load with 1, and the other way; the streaming merged save under ``fully_shard`` writes the same
files as one process.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

import fxpeft
from conftest import (
    assert_unchanged,
    rel_err,
    run_graph,
    snapshot,
    traced_base,
    traced_copy,
)

pytest.importorskip("transformers")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": False}


def _lora(gm=None, seed: int = 0, **kw):
    torch.manual_seed(seed)  # init_lora_weights=False: A and B both random, so the adapter changes the outputs
    return fxpeft.rewrite(traced_copy("llama") if gm is None else gm, fxpeft.LoraConfig(**{**LORA, **kw}))


def _files(d) -> dict[str, bytes]:
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)) if not f.startswith(".")}


def _values(gm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in fxpeft.adapter_state_dict(gm).items()}


# ------------------------------------------------------------------------------------------------ state dicts


def test_adapter_state_dict_has_the_file_keys_and_loads_back(tmp_path):
    from safetensors.torch import load_file

    gm = _lora()
    sd = fxpeft.adapter_state_dict(gm)
    fxpeft.save_adapter(gm, tmp_path)
    file = load_file(tmp_path / "adapter_model.safetensors")
    assert sd.keys() == file.keys() and all(torch.equal(sd[k], file[k]) for k in sd)
    want = run_graph(gm, "llama")
    other = _lora(seed=1)
    assert rel_err(run_graph(other, "llama"), want) > 1e-3
    fxpeft.set_adapter_state_dict(other, {k: v.clone() for k, v in sd.items()})
    assert torch.equal(run_graph(other, "llama"), want)


def test_shared_state_and_copies_go_through_the_state_dict():
    torch.manual_seed(0)
    gm = fxpeft.rewrite(traced_copy("llama"), fxpeft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    sd = _values(gm)
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(sd)  # VeRA's shared matrices, under PEFT's keys
    fresh = {k: torch.randn_like(v) for k, v in sd.items()}
    fxpeft.set_adapter_state_dict(gm, fresh)
    assert all(torch.equal(fxpeft.adapter_state_dict(gm)[k], fresh[k]) for k in sd)
    # modules_to_save copies too, under PEFT's keys
    cnn = fxpeft.rewrite(traced_copy("cnn"), fxpeft.LoraConfig(r=2, target_modules=["conv1"], modules_to_save=["fc"]))
    sd = _values(cnn)
    assert {"base_model.model.fc.weight", "base_model.model.fc.bias"} <= set(sd)  # as PEFT saves modules_to_save
    fresh = {k: torch.randn_like(v) for k, v in sd.items()}
    fxpeft.set_adapter_state_dict(cnn, fresh)
    assert all(torch.equal(fxpeft.adapter_state_dict(cnn)[k], fresh[k]) for k in sd)


def test_set_adapter_state_dict_refuses_bad_keys_and_shapes():
    gm = _lora()
    sd = _values(gm)
    snap = snapshot(gm)
    key = next(iter(sd))
    with pytest.raises(fxpeft.AdapterFileError, match="missing key") as e:
        fxpeft.set_adapter_state_dict(gm, {k: v for k, v in sd.items() if k != key})
    assert key in str(e.value)
    with pytest.raises(fxpeft.AdapterFileError, match="shape mismatch") as e:
        fxpeft.set_adapter_state_dict(gm, {**sd, key: torch.zeros(3, 3)})
    assert key in str(e.value)
    with pytest.raises(fxpeft.AdapterFileError, match="unexpected key.*nope"):
        fxpeft.set_adapter_state_dict(gm, {**sd, "base_model.model.nope.lora_A.weight": torch.zeros(1)})
    with pytest.raises(fxpeft.AdapterFileError, match="no adapter named 'other'"):
        fxpeft.adapter_state_dict(gm, "other")
    assert_unchanged(gm, snap)


# ------------------------------------------------------------------------------------------------ DCP, one process


def test_dcp_round_trip_and_consolidation_load_in_peft(tmp_path):
    import peft

    gm = _lora()
    want = run_graph(gm, "llama")
    fxpeft.save_adapter_dcp(gm, tmp_path / "dcp")
    assert (tmp_path / "dcp" / "adapter_config.json").is_file() and (tmp_path / "dcp" / ".metadata").is_file()
    other = _lora(seed=1)
    fxpeft.load_adapter_dcp(other, tmp_path / "dcp")
    assert all(torch.equal(a, b) for a, b in zip(_values(gm).values(), _values(other).values()))  # bit-exact

    assert fxpeft.consolidate_adapter(tmp_path / "dcp", tmp_path / "peft") == ["adapter_config.json",
                                                                                "adapter_model.safetensors"]
    assert _files(tmp_path / "peft")["adapter_model.safetensors"]
    model, _, kwargs, _ = traced_base("llama")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    with torch.no_grad():
        got = pm(**kwargs).logits
    assert rel_err(got, want) <= 1e-5
    again = fxpeft.load_adapter(traced_copy("llama"), tmp_path / "peft")
    assert torch.equal(run_graph(again, "llama"), want)
    # the same from the command line
    from fxpeft.cli import main

    assert main(["consolidate", str(tmp_path / "dcp"), str(tmp_path / "cli")]) == 0
    assert _files(tmp_path / "cli") == _files(tmp_path / "peft")
    assert main(["consolidate", str(tmp_path / "missing"), str(tmp_path / "cli2")]) == 1


def test_load_adapter_dcp_refuses_what_does_not_fit(tmp_path):
    gm = _lora()
    fxpeft.save_adapter_dcp(gm, tmp_path / "r4")
    fxpeft.save_adapter_dcp(_lora(r=8), tmp_path / "r8")
    fxpeft.save_adapter_dcp(_lora(target_modules=["q_proj", "k_proj"]), tmp_path / "qk")
    torch.manual_seed(0)
    fxpeft.save_adapter_dcp(fxpeft.rewrite(traced_copy("llama"), fxpeft.LoHaConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"])), tmp_path / "loha")
    fxpeft.save_adapter(gm, tmp_path / "peft")
    snap = snapshot(gm)
    cases = [(tmp_path / "missing", "does not exist"), (tmp_path / "peft", "not a torch.distributed.checkpoint"),
             (tmp_path / "r8", "shape mismatch.*lora_A"), (tmp_path / "qk", "missing key.*v_proj.*unexpected key.*k_proj"),
             (tmp_path / "loha", "'LOHA' adapter")]
    for where, msg in cases:
        with pytest.raises(fxpeft.AdapterFileError, match=msg):
            fxpeft.load_adapter_dcp(gm, where)
    with pytest.raises(fxpeft.AdapterFileError, match="does not exist"):
        fxpeft.consolidate_adapter(tmp_path / "missing", tmp_path / "out")
    for f in (tmp_path / "r4").glob("*.distcp"):  # a lost shard file: set aside, then put back
        os.rename(f, tmp_path / f.name)
    for call in (lambda: fxpeft.load_adapter_dcp(gm, tmp_path / "r4"),
                 lambda: fxpeft.consolidate_adapter(tmp_path / "r4", tmp_path / "out")):
        with pytest.raises(fxpeft.AdapterFileError, match="shard file is missing"):
            call()
    for f in tmp_path.glob("*.distcp"):
        os.rename(f, tmp_path / "r4" / f.name)
    assert_unchanged(gm, snap)
    fxpeft.load_adapter_dcp(gm, tmp_path / "r4")  # and the right one still loads
    assert_unchanged(gm, snap)


# ---------------------------------------------------------------------------------------- streaming save_merged


def test_streaming_save_merged_is_bit_identical_and_leaves_the_graph(tmp_path):
    model = traced_base("llama")[0]
    gm = _lora()
    torch.manual_seed(2)
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(**{**LORA, "target_modules": ["q_proj", "up_proj"]}), "second")
    fxpeft.set_adapter(gm, ["default", "second"])  # stacked on q_proj: both folds, in turn
    fxpeft.merge_adapter(gm, "default")  # already in the weights: written as it is, not folded twice
    torch.manual_seed(3)
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(**{**LORA, "target_modules": ["o_proj"]}), "off")  # not active: left out
    snap = snapshot(gm)
    streamed = fxpeft.save_merged(gm, tmp_path / "s", max_shard_size="60KB", config=model.config, merge=True)
    assert_unchanged(gm, snap)
    merged = fxpeft.merge(copy.deepcopy(gm))
    assert fxpeft.save_merged(merged, tmp_path / "m", max_shard_size="60KB", config=model.config) == streamed
    assert len(streamed) > 1 and _files(tmp_path / "s") == _files(tmp_path / "m")


def test_streaming_save_merged_conv_and_refusals(tmp_path):
    torch.manual_seed(0)
    cnn = fxpeft.rewrite(traced_copy("cnn"), fxpeft.LoraConfig(r=2, target_modules=["conv1", "fc"],
                                                               init_lora_weights=False))
    fxpeft.save_merged(cnn, tmp_path / "s", merge=True)
    fxpeft.save_merged(fxpeft.merge(copy.deepcopy(cnn)), tmp_path / "m")
    assert _files(tmp_path / "s") == _files(tmp_path / "m")

    with pytest.raises(fxpeft.AdapterFileError, match="merge=True"):
        fxpeft.save_merged(cnn, tmp_path / "x")
    tied = fxpeft.rewrite(traced_copy("gpt2"), fxpeft.LoraConfig(r=2, target_modules=["lm_head"]))
    saved = fxpeft.rewrite(traced_copy("cnn"), fxpeft.LoraConfig(r=2, target_modules=["conv1"],
                                                                 modules_to_save=["fc"]))
    for gm, msg in ((tied, "tied weights"), (saved, "modules_to_save")):
        snap = snapshot(gm)
        with pytest.raises(fxpeft.AdapterFileError, match=msg):
            fxpeft.save_merged(gm, tmp_path / "x", merge=True)
        assert_unchanged(gm, snap)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------- two processes (one spawn)


def _build(seed: int = 0):
    from fxpeft.zoo import tiny_llama

    model, _, kw = tiny_llama(layers=2, hidden=64, vocab=256, batch=2, seq=8, seed=0)
    torch.manual_seed(seed)
    return fxpeft.rewrite(fxpeft.trace(model, (), kw), fxpeft.LoraConfig(**LORA)), kw


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gm, kw = _build()
        fully_shard(gm)
        sharded = all(callable(getattr(t, "full_tensor", None)) for t in fxpeft.adapter_state_dict(gm).values())
        fxpeft.save_adapter_dcp(gm, f"{out}/dcp2")  # -> loaded by one process in the test
        fxpeft.save_merged(gm, f"{out}/merged2", max_shard_size="60KB", merge=True)  # streamed, gathered per tensor
        other, _ = _build(seed=1)
        fully_shard(other)
        fxpeft.load_adapter_dcp(other, f"{out}/dcp1")  # <- saved by one process in the test
        with torch.no_grad():
            logits = other(**kw).logits
        loaded = {k: v.full_tensor() for k, v in fxpeft.adapter_state_dict(other).items()}
        torch.save({"sharded": sharded, "loaded": loaded, "logits": logits}, f"{out}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while its peer still has traffic in flight (a SIGABRT otherwise)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
@pytest.mark.filterwarnings("ignore")
def test_two_gloo_processes_reshard_checkpoints_and_stream_the_merged_save(tmp_path):
    import torch.multiprocessing as mp

    gm, kw = _build()
    want = _values(gm)
    with torch.no_grad():
        logits = gm(**kw).logits
    fxpeft.save_adapter_dcp(gm, tmp_path / "dcp1")
    fxpeft.save_merged(gm, tmp_path / "merged1", max_shard_size="60KB", merge=True)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    # save with 1, load with 2: every rank holds the same values, bit for bit, and computes the same outputs
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert res["sharded"]  # the state dict held DTensor shards: DCP saved them without gathering
        assert res["loaded"].keys() == want.keys() and all(torch.equal(res["loaded"][k], want[k]) for k in want)
        assert rel_err(res["logits"], logits) <= 1e-5
    # save with 2, load with 1
    other, _ = _build(seed=1)
    fxpeft.load_adapter_dcp(other, tmp_path / "dcp2")
    assert all(torch.equal(v, want[k]) for k, v in _values(other).items())
    # the streamed merged save under fully_shard (rank 0 writes) equals one process's
    files = _files(tmp_path / "merged2")
    assert len(files) > 2 and files == _files(tmp_path / "merged1")
