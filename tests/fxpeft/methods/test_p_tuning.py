"""P-tuning against PEFT 0.21: with PEFT's encoder weights copied in, the same logits and loss on a tiny Llama (MLP
and LSTM encoders) and GPT-2, files both ways (PEFT's file holds the encoder's output), PEFT's trainable count, the
encoder as a submodule call that train()/eval() switch, training, the base model exactly while disabled, a loaded
file's fixed prompt, and typed refusals (merge included) that leave the graph unchanged."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from conftest import assert_unchanged, greedy_rerun, peft_counts, rel_err, snapshot
from conftest import traced_copy as _graph
from safetensors.torch import load_file

import fxpeft
from fxpeft import zoo
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.p_tuning import PromptEncoder

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),  # deepcopy of an export graph
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),  # PEFT, transformers 5
              pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")]

NV = 4
SHARED = "fxpeft_shared_p_tuning_default"


def _batch() -> dict[str, torch.Tensor]:
    """Row 0 left-padded, row 1 right-padded; labels -100 on the padding."""
    torch.manual_seed(3)
    ids = torch.randint(1, 256, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@functools.cache
def _padded(name: str):
    """(model, graph traced with input_ids, attention_mask and labels) of a 1-layer zoo model, once per module."""
    model = getattr(zoo, f"tiny_{name}")(layers=1)[0]
    return model, fxpeft.trace(model, (), {**_batch(), "use_cache": False})


def _cfg(kind: str = "MLP", **kw) -> peft.PromptEncoderConfig:
    return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV, encoder_hidden_size=32,
                                    encoder_reparameterization_type=kind, **kw)


def _out(out):
    """(loss, logits) of a graph's or PEFT's output."""
    return (out["loss"], out["logits"]) if isinstance(out, dict) else (out.loss, out.logits)


@pytest.mark.parametrize("name,kind", [("llama", "MLP"), ("llama", "LSTM"), ("gpt2", "MLP")])
def test_same_logits_as_peft_with_its_encoder_and_files_both_ways(name, kind, tmp_path):
    model, traced = _padded(name)
    batch = _batch()
    gm = fxpeft.rewrite(copy.deepcopy(traced), _cfg(kind)).eval()  # a PEFT config object
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, _cfg(kind))
    pm = peft.get_peft_model(copy.deepcopy(model), _cfg(kind)).eval()
    pm.prompt_encoder["default"].load_state_dict(gm.get_submodule(SHARED).state_dict())  # PEFT's names, all of them
    with torch.no_grad():
        ref_loss, ref = _out(pm(**batch))
        loss, logits = _out(gm(**batch))
        base = model(**batch).logits
    assert logits.shape == ref.shape == (2, NV + 10, 256)  # PEFT's layout: the virtual positions first
    assert rel_err(logits, ref) <= 1e-5 and rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(logits[:, NV:], base) > 1e-3  # the prompt really changes the real positions

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT: the encoder's output, as PEFT writes it
    saved = load_file(str(tmp_path / "fx" / WEIGHTS_NAME))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"prompt_embeddings": (NV, 64)}
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "P_TUNING" and config["encoder_reparameterization_type"] == kind
    assert config["encoder_hidden_size"] == 32 and config.get("target_modules") is None
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        assert rel_err(_out(back(**batch))[1], ref) <= 1e-5

    pm.save_pretrained(str(tmp_path / "peft"))  # PEFT -> fxpeft: the prompt fixed to the file's rows
    assert torch.allclose(load_file(str(tmp_path / "peft" / WEIGHTS_NAME))["prompt_embeddings"],
                          saved["prompt_embeddings"], atol=1e-6)
    with pytest.warns(UserWarning, match="encoder's output"):
        loaded = fxpeft.load_adapter(copy.deepcopy(traced), tmp_path / "peft").eval()
    with torch.no_grad():
        l_loss, l_logits = _out(loaded(**batch))
    assert rel_err(l_logits, ref) <= 1e-5 and rel_err(l_loss, ref_loss) <= 1e-5


def test_encoder_is_a_submodule_call_training_lowers_the_loss_and_disabling_gives_the_base():
    _, traced = _padded("llama")
    batch = _batch()
    torch.manual_seed(0)
    gm = fxpeft.rewrite(copy.deepcopy(traced), _cfg("LSTM", encoder_dropout=0.5)).train()
    assert "model_embed_tokens_prompt_encoder = self.fxpeft_shared_p_tuning_default()" in gm.code
    enc = gm.get_submodule(SHARED)
    assert isinstance(enc, PromptEncoder)
    with torch.no_grad():  # the LSTM's dropout is on in train(), off in eval()
        assert not torch.equal(_out(gm(**batch))[1], _out(gm(**batch))[1])
        gm.eval()
        assert torch.equal(_out(gm(**batch))[1], _out(gm(**batch))[1])
    gm.train()
    frozen = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    trained = {n: p for n, p in gm.named_parameters() if p.requires_grad}
    assert all(n.startswith(SHARED + ".") for n in trained)  # only the encoder trains
    opt = torch.optim.Adam(trained.values(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = _out(gm(**batch))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in gm.named_parameters() if n in frozen)
    gm.eval()
    with torch.no_grad(), fxpeft.disable_adapters(gm):  # no virtual tokens: the base model, bit for bit
        off_loss, off = _out(gm(**batch))
        base_loss, base = _out(traced(**batch))
    assert off.shape == (2, 10, 256) and torch.equal(off, base) and torch.equal(off_loss, base_loss)
    fxpeft.delete_adapter(gm, "default")  # the encoder goes with it
    assert gm.code == traced.code and not any(isinstance(m, PromptEncoder) for m in gm.modules())


def test_a_loaded_file_trains_its_rows_directly(tmp_path):
    _, traced = _padded("gpt2")
    gm = fxpeft.rewrite(copy.deepcopy(traced), _cfg("MLP"))
    fxpeft.save_adapter(gm, tmp_path)
    with pytest.warns(UserWarning, match="tunes these rows directly"):
        loaded = fxpeft.load_adapter(copy.deepcopy(traced), tmp_path)
    enc = loaded.get_submodule(SHARED)
    assert enc.kind == "FIXED" and not hasattr(enc, "mlp_head")
    assert [tuple(p.shape) for p in loaded.parameters() if p.requires_grad] == [(NV, 64)]
    assert torch.equal(enc(), load_file(str(tmp_path / WEIGHTS_NAME))["prompt_embeddings"])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_is_refused_with_the_graph_unchanged(name):
    gm = fxpeft.rewrite(copy.deepcopy(_padded(name)[1]), fxpeft.PromptEncoderConfig(num_virtual_tokens=2))
    snap = snapshot(gm)
    with pytest.raises(fxpeft.errors.MergeError, match="nothing to fold"):
        fxpeft.merge(gm)
    assert_unchanged(gm, snap)


def test_typed_refusals_leave_the_graph_unchanged():
    gm = _graph("llama")
    snap = snapshot(gm)
    bad = [({"num_virtual_tokens": 0}, "positive"),
           ({}, "num_virtual_tokens"),
           ({"num_virtual_tokens": 2, "encoder_reparameterization_type": "GRU"}, "MLP"),
           ({"num_virtual_tokens": 2, "encoder_hidden_size": 0}, "encoder_hidden_size"),
           ({"num_virtual_tokens": 2, "encoder_num_layers": 0}, "encoder_num_layers"),
           ({"num_virtual_tokens": 2, "encoder_dropout": 1.0}, "encoder_dropout"),
           ({"num_virtual_tokens": 2, "token_dim": 32}, "token_dim"),
           ({"num_virtual_tokens": 2, "num_transformer_submodules": 2}, "encoder-decoder")]
    for fields, match in bad:
        with pytest.raises(fxpeft.ConfigError, match=match):
            fxpeft.rewrite(gm, fxpeft.PromptEncoderConfig(**fields))
        assert_unchanged(gm, snap)
    fxpeft.rewrite(gm, fxpeft.PromptTuningConfig(num_virtual_tokens=2), adapter_name="a")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.errors.FxPeftError, match="prompt_tuning"):  # one prompt method at a time
        fxpeft.rewrite(gm, fxpeft.PromptEncoderConfig(num_virtual_tokens=3), adapter_name="b")
    assert_unchanged(gm, snap)

    cnn = _graph("cnn")  # a model with no embedding node
    snap = snapshot(cnn)
    with pytest.raises(fxpeft.errors.UnsupportedSiteError, match="no embedding node"):
        fxpeft.rewrite(cnn, fxpeft.PromptEncoderConfig(num_virtual_tokens=2))
    assert_unchanged(cnn, snap)


@pytest.mark.parametrize("name,kind", [("llama", "LSTM"), ("gpt2", "MLP")])
def test_greedy_generation_gives_the_tokens_of_peft_forward_rerun(name, kind):
    model, traced = _padded(name)
    gm = fxpeft.rewrite(copy.deepcopy(traced), _cfg(kind)).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), _cfg(kind)).eval()
    pm.prompt_encoder["default"].load_state_dict(gm.get_submodule(SHARED).state_dict())
    ids = _batch()["input_ids"][:, :6]
    inputs = lambda x: {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    got, got_last = greedy_rerun(lambda x: _out(gm(**inputs(x)))[1], ids)
    ref, ref_last = greedy_rerun(lambda x: pm(**inputs(x)).logits, ids)  # the encoder's prompt goes in at every step
    assert got.shape == (2, 10) and torch.equal(got, ref) and rel_err(got_last, ref_last) <= 1e-5
    assert rel_err(got_last, greedy_rerun(lambda x: model(**inputs(x)).logits, ids)[1]) > 1e-3  # not the base's


@pytest.mark.heavy  # a second torch.export (the prompt-tuning file exports on every run)
@pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights:UserWarning")  # torch's nn.LSTM on export
def test_pt2_export_keeps_the_encoder_prompt_at_another_size(tmp_path):
    _, traced = _padded("llama")
    gm = fxpeft.rewrite(copy.deepcopy(traced), _cfg("LSTM")).eval()
    torch.manual_seed(5)
    ids = torch.randint(1, 256, (3, 7))
    other = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        ref_loss, ref = _out(gm(**other))
    fxpeft.export(gm, tmp_path / "p.pt2", kwargs={**_batch(), "use_cache": False})  # the encoder call goes in too
    with torch.no_grad():
        loss, logits = _out(torch.export.load(str(tmp_path / "p.pt2")).module()(**other, use_cache=False))
        assert torch.equal(_out(gm(**other))[1], ref)  # the graph itself is as it was
    assert logits.shape == (3, NV + 7, 256) and rel_err(logits, ref) <= 1e-6 and rel_err(loss, ref_loss) <= 1e-6
