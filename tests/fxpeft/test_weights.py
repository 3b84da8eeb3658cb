"""fxpeft.weights: build on the meta device, trace, stream an HF safetensors checkpoint in (single file or shards),
then rewrite: the same outputs as tracing the real model; typed errors that leave the graph as it was."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch
from conftest import out_tensor, run_graph, traced_base, traced_copy

import fxpeft
from fxpeft import zoo
from fxpeft.tags import graph_info, set_graph_info

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


def _llama_pair(tmp_path, shard: str | None = "60KB"):
    """A real tiny Llama saved with save_pretrained (sharded when ``shard``), and the same config on meta."""
    model, _, kw = zoo.tiny_llama(layers=2, hidden=64, vocab=256)
    model.save_pretrained(tmp_path, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    with fxpeft.empty_weights():
        empty = type(model)(model.config).eval()
    return model, empty, kw


def test_empty_weights_puts_parameters_on_meta_and_keeps_buffers_real():
    with fxpeft.empty_weights():
        m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    assert all(p.is_meta for p in m.parameters())
    assert not any(b.is_meta for b in m.buffers())
    assert sorted(fxpeft.meta_tensors(m)) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert not torch.nn.Linear(2, 2).weight.is_meta  # the patch is gone after the block


@pytest.mark.parametrize("shard", ["60KB", None], ids=["sharded-index", "single-file"])
def test_meta_trace_then_streamed_load_gives_the_real_model_bit_for_bit(tmp_path, shard):
    model, empty, kw = _llama_pair(tmp_path, shard)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") == (shard is not None)
    gm = fxpeft.trace(empty, (), kw)
    assert fxpeft.meta_tensors(gm)
    fxpeft.load_weights(gm, tmp_path)
    assert fxpeft.meta_tensors(gm) == []
    real = fxpeft.trace(model, (), kw)
    run = {k: v for k, v in kw.items() if k != "use_cache"}
    with torch.no_grad():
        assert torch.equal(out_tensor(gm(**run)), out_tensor(real(**run)))
    # then a rewrite with the same seed gives the same adapters and outputs as rewriting the real graph
    cfg = fxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    torch.manual_seed(3)
    fxpeft.rewrite(gm, cfg)
    torch.manual_seed(3)
    fxpeft.rewrite(real, cfg)
    with torch.no_grad():
        assert torch.equal(out_tensor(gm(**run)), out_tensor(real(**run)))
    assert fxpeft.get_nb_trainable_parameters(gm) == fxpeft.get_nb_trainable_parameters(real)


def test_tied_weights_stored_once_fill_both_names(tmp_path):
    model, _, kw = zoo.tiny_gpt2()
    model.save_pretrained(tmp_path, safe_serialization=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # the tie: stored once
    with fxpeft.empty_weights():
        empty = type(model)(model.config).eval()
    gm = fxpeft.load_weights(fxpeft.trace(empty, (), kw), tmp_path, strict=False)
    assert fxpeft.meta_tensors(gm) == []
    run = {k: v for k, v in kw.items() if k != "use_cache"}
    with torch.no_grad():
        assert torch.equal(out_tensor(gm(**run)), out_tensor(model(**run)))


def _meta_graph(empty, kw):
    gm = fxpeft.trace(empty, (), kw)
    return gm, sorted(fxpeft.meta_tensors(gm))


def test_bad_checkpoints_are_typed_errors_and_nothing_is_loaded(tmp_path):
    model, empty, kw = _llama_pair(tmp_path)
    gm, before = _meta_graph(empty, kw)
    with pytest.raises(fxpeft.WeightsError, match="neither"):
        fxpeft.load_weights(gm, tmp_path / "nowhere")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.rename(tmp_path / shard, tmp_path / "moved")
    with pytest.raises(fxpeft.WeightsError, match="missing"):
        fxpeft.load_weights(gm, tmp_path)
    os.rename(tmp_path / "moved", tmp_path / shard)
    # another configuration: shapes differ
    other = tmp_path / "other"
    zoo.tiny_llama(layers=2, hidden=32, vocab=256).model.save_pretrained(other, safe_serialization=True)
    with pytest.raises(fxpeft.WeightsError, match="another model configuration"):
        fxpeft.load_weights(gm, other)
    # a checkpoint lacking weights the graph has
    fewer = tmp_path / "fewer"
    zoo.tiny_llama(layers=1, hidden=64, vocab=256).model.save_pretrained(fewer, safe_serialization=True)
    with pytest.raises(fxpeft.WeightsError, match="has no tensor for"):
        fxpeft.load_weights(gm, fewer)
    # a checkpoint with more tensors than the graph: refused when strict, skipped when not
    more = tmp_path / "more"
    zoo.tiny_llama(layers=3, hidden=64, vocab=256).model.save_pretrained(more, safe_serialization=True)
    with pytest.raises(fxpeft.WeightsError, match="strict=False"):
        fxpeft.load_weights(gm, more)
    assert sorted(fxpeft.meta_tensors(gm)) == before  # nothing was loaded by any failed call


def test_a_failure_while_reading_puts_every_tensor_back(tmp_path, monkeypatch):
    _, empty, kw = _llama_pair(tmp_path)
    gm, before = _meta_graph(empty, kw)
    import safetensors

    real_open, reads = safetensors.safe_open, []

    class Failing:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_slice(self, name):
            return self.f.get_slice(name)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            reads.append(name)
            if len(reads) > 5:
                raise OSError("disk went away")
            return self.f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Failing)
    with pytest.raises(OSError, match="disk went away"):
        fxpeft.load_weights(gm, tmp_path)
    assert len(reads) == 6 and sorted(fxpeft.meta_tensors(gm)) == before


# ---------------------------------------------------------------------------------------- rewrite before load


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    """traced_base("llama")'s model saved as a checkpoint, and a graph of the same config traced on meta weights."""
    model, _, kw, _ = traced_base("llama")
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d, safe_serialization=True, max_shard_size="200KB")
    with fxpeft.empty_weights():
        empty = type(model)(model.config).eval()
    return d, fxpeft.trace(empty, (), kw)


def _adapters(gm) -> dict[str, torch.Tensor]:
    return {k: v for k, v in gm.state_dict().items() if any(m in k for m in ("lora_", "vera_", "copy_", "fxpeft_"))}


def _rewrite(gm, cfgs, seed=3):
    torch.manual_seed(seed)
    for i, cfg in enumerate(cfgs):
        fxpeft.rewrite(gm, cfg, adapter_name="default" if i == 0 else f"a{i}")
    return gm


_CASES = {
    "lora-gaussian+second-adapter": [fxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights="gaussian"),
                                     fxpeft.LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights="gaussian")],
    "vera-shared-state": [fxpeft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)],
    "modules-to-save": [fxpeft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                          init_lora_weights=False)],
    "pissa-base-update": [fxpeft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights="pissa")],
    "dora-magnitude": [fxpeft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)],
}


@pytest.mark.parametrize("case", list(_CASES))
def test_rewrite_before_load_gives_the_adapters_a_loaded_rewrite_gives(llama_ckpt, case):
    d, meta_base = llama_ckpt
    gm = _rewrite(copy.deepcopy(meta_base), _CASES[case])
    assert [b.adapter for b in graph_info(gm).pending_builds] == ["default", "a1"][:len(_CASES[case])]
    torch.manual_seed(11)
    fxpeft.load_weights(gm, d)
    assert torch.equal(torch.random.get_rng_state(), torch.manual_seed(11).get_state())  # the caller's RNG kept
    assert fxpeft.meta_tensors(gm) == [] and graph_info(gm).pending_builds == ()
    real = _rewrite(traced_copy("llama"), _CASES[case])
    ours, want = _adapters(gm), _adapters(real)
    assert ours.keys() == want.keys() and ours
    # DoRA's magnitude is a norm of the loaded weight: equal to an ulp (6e-8), not bit for bit
    same = (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=0)) if case == "dora-magnitude" else torch.equal
    for k in want:
        assert same(ours[k], want[k]), k
    assert gm.state_dict().keys() == real.state_dict().keys()
    assert all(same(v, real.state_dict()[k]) for k, v in gm.state_dict().items())  # PiSSA's residual too
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == \
        {n for n, p in real.named_parameters() if p.requires_grad}
    assert same(run_graph(gm, "llama"), run_graph(real, "llama"))
    if case == "modules-to-save":  # init_lora_weights=False draws B too: the outputs really left the base
        assert not torch.equal(run_graph(gm, "llama"), run_graph(traced_base("llama")[3], "llama"))


def test_adapters_switched_off_or_deleted_before_loading_stay_so(llama_ckpt):
    d, meta_base = llama_ckpt
    gm = _rewrite(copy.deepcopy(meta_base), _CASES["lora-gaussian+second-adapter"][:1])
    fxpeft.disable_adapters(gm)
    fxpeft.load_weights(gm, d)
    assert torch.equal(run_graph(gm, "llama"), run_graph(traced_base("llama")[3], "llama"))
    # deleted before loading: the draws and PiSSA's residual happen as they would on the loaded graph
    cfgs = [_CASES["pissa-base-update"][0], fxpeft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False)]
    graphs = [_rewrite(copy.deepcopy(meta_base), cfgs), _rewrite(traced_copy("llama"), cfgs)]
    for g in graphs:
        fxpeft.set_adapter(g, "a1")
        fxpeft.delete_adapter(g, "default")
    fxpeft.load_weights(graphs[0], d)
    assert torch.equal(run_graph(graphs[0], "llama"), run_graph(graphs[1], "llama"))


def test_running_a_graph_on_meta_weights_is_a_weights_error_until_loaded(llama_ckpt):
    d, meta_base = llama_ckpt
    import pickle

    for gm in (copy.deepcopy(meta_base), pickle.loads(pickle.dumps(meta_base))):
        with pytest.raises(fxpeft.WeightsError, match=r"fxpeft.load_weights\(gm, directory\)"):
            run_graph(gm, "llama")
    fxpeft.load_weights(gm, d)
    assert not gm._forward_pre_hooks  # the guard is gone: a loaded graph pays nothing per call
    assert torch.equal(run_graph(gm, "llama"), run_graph(traced_base("llama")[3], "llama"))
    assert not traced_base("llama")[3]._forward_pre_hooks  # a graph traced on real weights never had one


def test_a_failure_mid_replay_leaves_the_graph_as_it_was(llama_ckpt, monkeypatch):
    d, meta_base = llama_ckpt
    gm = _rewrite(copy.deepcopy(meta_base), [*_CASES["lora-gaussian+second-adapter"],
                                             fxpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")])
    code, meta, pending = gm.code, sorted(fxpeft.meta_tensors(gm)), graph_info(gm).pending_builds
    from fxpeft.passes import inject

    real_build, calls = inject.build_adapters, []

    def failing(*a, **k):
        calls.append(a[3])
        if len(calls) == 3:  # after two adapters (and the first's values) went in
            raise RuntimeError("out of memory")
        return real_build(*a, **k)

    monkeypatch.setattr(inject, "build_adapters", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        fxpeft.load_weights(gm, d)
    assert calls == ["default", "a1", "a2"]
    assert gm.code == code and sorted(fxpeft.meta_tensors(gm)) == meta and graph_info(gm).pending_builds == pending
    monkeypatch.undo()
    fxpeft.load_weights(gm, d)  # and it loads afterwards, as if nothing had happened
    real = _rewrite(traced_copy("llama"), [*_CASES["lora-gaussian+second-adapter"],
                                           fxpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")])
    assert torch.equal(run_graph(gm, "llama"), run_graph(real, "llama"))


def test_a_partly_loaded_graph_is_refused_and_a_record_less_meta_adapter_too(llama_ckpt):
    d, meta_base = llama_ckpt
    gm = copy.deepcopy(meta_base)
    q = gm.get_submodule("model.layers.0.self_attn.q_proj")
    q.weight = torch.nn.Parameter(torch.zeros(q.weight.shape), requires_grad=False)
    before = gm.code
    with pytest.raises(fxpeft.WeightsError, match="or none before the rewrite"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert gm.code == before
    gm = _rewrite(copy.deepcopy(meta_base), [fxpeft.LoraConfig(r=2, target_modules=["q_proj"])])
    set_graph_info(gm, dataclasses.replace(graph_info(gm), pending_builds=()))  # a graph that lost its records
    with pytest.raises(fxpeft.WeightsError, match="no record of how they were built"):
        fxpeft.load_weights(gm, d)
    assert graph_info(gm).pending_builds == () and fxpeft.meta_tensors(gm)


def test_loading_an_adapter_file_onto_meta_weights_is_refused(llama_ckpt, tmp_path):
    _, meta_base = llama_ckpt
    real = _rewrite(traced_copy("llama"), _CASES["modules-to-save"])
    fxpeft.save_adapter(real, tmp_path)
    gm = copy.deepcopy(meta_base)
    before = gm.code, sorted(gm.state_dict())
    with pytest.raises(fxpeft.WeightsError, match="load_weights"):  # its values would land in tensors holding none
        fxpeft.load_adapter(gm, tmp_path)
    assert (gm.code, sorted(gm.state_dict())) == before
