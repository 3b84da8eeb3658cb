"""fxpeft.weights: build on the meta device, trace, stream an HF safetensors checkpoint in (single file or shards),
then rewrite: the same outputs as tracing the real model; typed errors that leave the graph as it was."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import out_tensor

import fxpeft
from fxpeft import zoo

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


def test_adapters_built_on_meta_are_refused_with_the_order_to_follow(tmp_path):
    _, empty, kw = _llama_pair(tmp_path)
    gm = fxpeft.rewrite(fxpeft.trace(empty, (), kw), fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    before = sorted(fxpeft.meta_tensors(gm))
    with pytest.raises(fxpeft.WeightsError, match="load the base weights first, then rewrite"):
        fxpeft.load_weights(gm, tmp_path)
    assert sorted(fxpeft.meta_tensors(gm)) == before
