"""Prompt tuning against PEFT 0.21: files both ways with the same logits and loss on a tiny Llama and GPT-2 (left and
right padding), PEFT's output layout ``[B, NV+T, V]``, the base model exactly while disabled, removal back to the base
code, training, PEFT's trainable count, a symbolic_trace functional LM, and typed refusals (merge included) that leave
the graph unchanged."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, greedy_rerun, out_tensor, peft_counts, rel_err, snapshot
from conftest import traced_base as _base
from conftest import traced_copy as _graph
from safetensors.torch import load_file

import fxpeft
from fxpeft import zoo
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.prompt_tuning import PromptTuningAdapter

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),  # deepcopy of an export graph
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),  # PEFT, transformers 5
              pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")]

NV = 4


def _batch(vocab: int = 256) -> dict[str, torch.Tensor]:
    """Row 0 left-padded, row 1 right-padded; labels -100 on the padding (as a collator writes them)."""
    torch.manual_seed(3)
    ids = torch.randint(1, vocab, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@functools.cache
def _padded(name: str):
    """(model, graph traced with input_ids, attention_mask and labels) of a 1-layer zoo model, once per module."""
    model = getattr(zoo, f"tiny_{name}")(layers=1)[0]
    return model, fxpeft.trace(model, (), {**_batch(), "use_cache": False})


def _out(out):
    """(loss, logits) of a graph's or PEFT's output."""
    return (out["loss"], out["logits"]) if isinstance(out, dict) else (out.loss, out.logits)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_files_load_with_the_same_logits_and_loss_and_fxpeft_files_load_in_peft(name, tmp_path):
    model, traced = _padded(name)
    batch = _batch()
    torch.manual_seed(1)  # RANDOM init: N(0, 1) rows, far from any token's embedding
    pm = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=NV)).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        ref_loss, ref = _out(pm(**batch))
        base_logits = model(**batch).logits
    assert ref.shape == (2, NV + 10, 256)  # PEFT's layout: the virtual positions come first

    gm = fxpeft.load_adapter(copy.deepcopy(traced), tmp_path / "peft").eval()  # PEFT -> fxpeft
    with torch.no_grad():
        loss, logits = _out(gm(**batch))
    assert logits.shape == ref.shape
    assert rel_err(logits, ref) <= 1e-5 and rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(logits[:, NV:], base_logits) > 1e-2  # the prompt really changes the real positions
    path = tmp_path / "peft" / CONFIG_NAME  # a TEXT-initialised PEFT file loads without a tokenizer: the prompt is the file's
    path.write_text(json.dumps({**json.loads(path.read_text()), "prompt_tuning_init": "TEXT",
                                "prompt_tuning_init_text": "Classify:", "tokenizer_name_or_path": "gpt2"}))
    with torch.no_grad():
        assert torch.equal(_out(fxpeft.load_adapter(copy.deepcopy(traced), tmp_path / "peft")(**batch))[1], logits)

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    saved = load_file(str(tmp_path / "fx" / WEIGHTS_NAME))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"prompt_embeddings": (NV, 64)}
    assert torch.equal(saved["prompt_embeddings"], load_file(str(tmp_path / "peft" / WEIGHTS_NAME))["prompt_embeddings"])
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert config["num_virtual_tokens"] == NV and config.get("target_modules") is None
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        back_loss, back_logits = _out(back(**batch))
    assert rel_err(back_logits, ref) <= 1e-5 and rel_err(back_loss, ref_loss) <= 1e-5


def test_fxpeft_init_loads_in_peft_and_disabling_gives_exactly_the_base(tmp_path):
    model, traced = _padded("llama")
    batch = _batch()
    gm = fxpeft.rewrite(copy.deepcopy(traced), fxpeft.PromptTuningConfig(num_virtual_tokens=NV,
                                                                         prompt_tuning_init="SAMPLE_VOCAB")).eval()
    (table,) = [p for p in gm.parameters() if p.requires_grad]
    weight = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, w) for w in weight) for row in table)  # SAMPLE_VOCAB: rows of the embedding
    fxpeft.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        assert rel_err(_out(gm(**batch))[1], pm(**batch).logits) <= 1e-5
        with fxpeft.disable_adapters(gm):  # no virtual tokens: the base model, bit for bit, [B, T, V]
            off_loss, off = _out(gm(**batch))
        base_loss, base = _out(traced(**batch))
    assert off.shape == (2, 10, 256) and torch.equal(off, base) and torch.equal(off_loss, base_loss)
    assert _out(gm(**batch))[1].shape == (2, NV + 10, 256)  # back on


def test_peft_config_object_counts_and_removal_back_to_the_base_code():
    model, _, kwargs, traced = _base("llama")  # traced without a mask: positions come from input_ids alone
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    gm = fxpeft.rewrite(_graph("llama"), copy.deepcopy(cfg))
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, cfg)
    (ad,) = [m for m in fxpeft.adapters(gm).values() if isinstance(m, PromptTuningAdapter)]
    assert ad.site_name == "model.embed_tokens"
    ids = kwargs["input_ids"]
    with torch.no_grad():
        got = out_tensor(gm(input_ids=ids))
        pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(cfg)).eval()
        pm.prompt_encoder["default"].embedding.weight.copy_(gm.get_parameter(
            "fxpeft_shared_prompt_tuning_default.prompt_embeddings"))
        assert rel_err(got, pm(input_ids=ids).logits) <= 1e-5 and got.shape == (2, 21, 256)
    assert "model_embed_tokens_with_prompt = torch.ops.aten.slice_scatter" in gm.code  # reads as the edit it is
    fxpeft.delete_adapter(gm, "default")
    assert gm.code == traced.code


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_is_refused_with_the_graph_unchanged(name):
    gm = fxpeft.rewrite(copy.deepcopy(_padded(name)[1]), fxpeft.PromptTuningConfig(num_virtual_tokens=2))
    snap = snapshot(gm)
    # GPT-2's wte is tied to lm_head: merge_adapter refuses the tie first (also a MergeError)
    for merge in (fxpeft.merge_adapter, fxpeft.merge) if name == "llama" else (fxpeft.merge,):
        with pytest.raises(fxpeft.errors.MergeError, match="nothing to fold"):
            merge(gm)
        assert_unchanged(gm, snap)


def test_training_moves_only_the_prompt_and_lowers_the_loss():
    _, traced = _padded("gpt2")
    batch = _batch()
    gm = fxpeft.rewrite(copy.deepcopy(traced), fxpeft.PromptTuningConfig(num_virtual_tokens=NV)).train()
    frozen = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    trained = [p for p in gm.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in trained] == [(NV, 64)]
    opt = torch.optim.Adam(trained, lr=0.1)
    losses = []
    for _ in range(5):
        loss = _out(gm(**batch))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in gm.named_parameters() if n in frozen)


def test_symbolic_trace_functional_lm():
    model, (idx,), _ = zoo.functional_lm()
    gm = fxpeft.rewrite(fxpeft.trace(model), fxpeft.PromptTuningConfig(num_virtual_tokens=3))
    (table,) = [p for p in gm.parameters() if p.requires_grad]
    with torch.no_grad():  # the model's own forward on [prompt; embeddings]
        x = torch.cat([table.expand(2, -1, -1), F.embedding(idx, model.emb)], 1)
        for blk in model.blocks:
            x = x + F.gelu(F.linear(x, blk.w_in, blk.b_in)) @ blk.w_out
        ref = x @ model.head.weight.t()
        assert rel_err(gm(idx), ref) <= 1e-6 and gm(idx).shape == (2, 15, 64)
        with fxpeft.disable_adapters(gm):
            assert torch.equal(gm(idx), model(idx))


def test_typed_refusals_leave_the_graph_unchanged():
    gm = _graph("llama")
    snap = snapshot(gm)
    bad = [({"num_virtual_tokens": 0}, fxpeft.ConfigError, "positive"),
           ({"num_virtual_tokens": -2}, fxpeft.ConfigError, "positive"),
           ({}, fxpeft.ConfigError, "num_virtual_tokens"),
           ({"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}, fxpeft.ConfigError,
            "tokenizer"),
           ({"num_virtual_tokens": 2, "token_dim": 32}, fxpeft.ConfigError, "token_dim"),
           ({"num_virtual_tokens": 2, "num_transformer_submodules": 2}, fxpeft.ConfigError, "encoder-decoder"),
           ({"num_virtual_tokens": 2, "target_modules": ["q_proj"]}, fxpeft.errors.FxPeftError, "embedding")]
    for fields, error, match in bad:
        with pytest.raises(error, match=match):
            fxpeft.rewrite(gm, fxpeft.PromptTuningConfig(**fields))
        assert_unchanged(gm, snap)
    text = {"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT"}
    for fields, match in [({**text, "prompt_tuning_init_token_ids": []}, "non-empty"),
                          ({**text, "prompt_tuning_init_token_ids": [3, -1]}, "ints >= 0"),
                          ({**text, "prompt_tuning_init_token_ids": [3, 256]}, "outside the input embedding"),
                          ({"num_virtual_tokens": 2, "prompt_tuning_init_token_ids": [3]}, "ignored")]:
        with pytest.raises(fxpeft.ConfigError, match=match):
            fxpeft.rewrite(gm, fxpeft.PromptTuningConfig(**fields))
        assert_unchanged(gm, snap)
    with pytest.raises(fxpeft.errors.FxPeftError, match="tokenizer"):  # PEFT accepts TEXT with a tokenizer name
        fxpeft.rewrite(gm, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                                   prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                                                   tokenizer_name_or_path="gpt2"))
    assert_unchanged(gm, snap)

    fxpeft.rewrite(gm, fxpeft.PromptTuningConfig(num_virtual_tokens=2), adapter_name="a")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.errors.UnsupportedSiteError, match="one prompt per graph"):
        fxpeft.rewrite(gm, fxpeft.PromptTuningConfig(num_virtual_tokens=3), adapter_name="b")
    assert_unchanged(gm, snap)

    cnn = _graph("cnn")  # a model with no embedding node
    snap = snapshot(cnn)
    with pytest.raises(fxpeft.errors.UnsupportedSiteError, match="no embedding node"):
        fxpeft.rewrite(cnn, fxpeft.PromptTuningConfig(num_virtual_tokens=2))
    assert_unchanged(cnn, snap)


def test_bert_encoder_with_a_padded_mask():
    model, _, kwargs, _ = _base("bert")  # the encoder's positions and token types are sliced to NV+T as in PEFT
    cfg = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3)
    gm = fxpeft.rewrite(_graph("bert"), copy.deepcopy(cfg)).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    mask = kwargs["attention_mask"].clone()
    mask[0, :4] = 0
    mask[1, -3:] = 0
    with torch.no_grad():
        (table,) = [p for p in gm.parameters() if p.requires_grad]
        pm.prompt_encoder["default"].embedding.weight.copy_(table)
        got = out_tensor(gm(input_ids=kwargs["input_ids"], attention_mask=mask))
        ref = pm(input_ids=kwargs["input_ids"], attention_mask=mask).last_hidden_state
    assert got.shape == (2, 3 + 16, 64) and rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_generation_gives_the_tokens_of_peft_forward_rerun(name):
    model, traced = _padded(name)
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV)
    gm = fxpeft.rewrite(copy.deepcopy(traced), copy.deepcopy(cfg)).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(gm.get_parameter(
            "fxpeft_shared_prompt_tuning_default.prompt_embeddings"))
    ids = _batch()["input_ids"][:, :6]
    inputs = lambda x: {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    got, got_last = greedy_rerun(lambda x: _out(gm(**inputs(x)))[1], ids)
    ref, ref_last = greedy_rerun(lambda x: pm(**inputs(x)).logits, ids)  # the prompt goes in at every step
    assert got.shape == (2, 10) and torch.equal(got, ref) and rel_err(got_last, ref_last) <= 1e-5
    assert rel_err(got_last, greedy_rerun(lambda x: model(**inputs(x)).logits, ids)[1]) > 1e-3  # not the base's


def test_export_graph_runs_at_other_sizes_and_a_pt2_keeps_the_prompt_and_the_dynamic_dims(tmp_path):
    model, traced = _padded("llama")
    gm = fxpeft.rewrite(copy.deepcopy(traced), fxpeft.PromptTuningConfig(num_virtual_tokens=NV)).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=NV)).eval()
    with torch.no_grad():
        (table,) = [p for p in gm.parameters() if p.requires_grad]
        pm.prompt_encoder["default"].embedding.weight.copy_(table)
    torch.manual_seed(5)  # another batch size and length than traced, padded on the left
    ids = torch.randint(1, 256, (3, 7))
    other = {"input_ids": ids, "attention_mask": torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0),
             "labels": ids}
    with torch.no_grad():
        loss, logits = _out(gm(**other))
        ref_loss, ref = _out(pm(**other))
    assert logits.shape == (3, NV + 7, 256) and rel_err(logits, ref) <= 1e-5 and rel_err(loss, ref_loss) <= 1e-5

    path = tmp_path / "prompt.pt2"
    fxpeft.export(gm, path, kwargs={**_batch(), "use_cache": False})  # unmerged: the prompt is a parameter
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        p_loss, p_logits = _out(loaded(**other, use_cache=False))
    assert p_logits.shape == (3, NV + 7, 256) and rel_err(p_logits, logits) <= 1e-6 and rel_err(p_loss, loss) <= 1e-6


@pytest.mark.heavy
def test_torch_compile_fullgraph_gives_the_same_logits_and_follows_disable():
    _, traced = _padded("llama")
    gm = fxpeft.rewrite(copy.deepcopy(traced), fxpeft.PromptTuningConfig(num_virtual_tokens=NV)).eval()
    batch = _batch()
    compiled = torch.compile(gm, fullgraph=True)  # the on/off choice is a guarded Python flag: no graph break
    with torch.no_grad():
        ref, got = _out(gm(**batch))[1], _out(compiled(**batch))[1]
        assert got.shape == (2, NV + 10, 256) and rel_err(got, ref) <= 1e-5
        with fxpeft.disable_adapters(gm):
            off = _out(compiled(**batch))[1]
        assert off.shape == (2, 10, 256) and rel_err(off, _out(traced(**batch))[1]) <= 1e-5


@functools.cache
def _bert_cls():
    """A 1-layer ``BertForSequenceClassification`` (3 labels) and its graph traced with a padded mask and labels."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128, num_labels=3)).eval()
    ids = torch.randint(1, 256, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2])}
    return model, batch, fxpeft.trace(model, (), batch)


def test_bert_sequence_classification_with_the_classifier_saved_files_both_ways_and_training(tmp_path):
    model, batch, traced = _bert_cls()
    cfg = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)  # PEFT adds classifier to modules_to_save
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(cfg)).eval()
    with torch.no_grad():  # a trained head: the saved copy differs from the base classifier
        pm.base_model.classifier.modules_to_save["default"].weight.add_(torch.randn(3, 64))
        ref_loss, ref = _out(pm(**batch))
    pm.save_pretrained(str(tmp_path / "peft"))
    assert set(load_file(str(tmp_path / "peft" / WEIGHTS_NAME))) == {
        "prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}  # PEFT's prompt keys

    gm = fxpeft.load_adapter(copy.deepcopy(traced), tmp_path / "peft").eval()  # PEFT -> fxpeft, classifier included
    with torch.no_grad():
        loss, logits = _out(gm(**batch))
        base = model(**batch).logits
    assert logits.shape == (2, 3) and rel_err(logits, ref) <= 1e-5 and rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(logits, base) > 1e-2
    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    assert set(load_file(str(tmp_path / "fx" / WEIGHTS_NAME))) == set(load_file(str(tmp_path / "peft" / WEIGHTS_NAME)))
    assert json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())["task_type"] == "SEQ_CLS"
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        assert rel_err(back(**batch).logits, ref) <= 1e-5

    gm = fxpeft.rewrite(copy.deepcopy(traced), copy.deepcopy(cfg)).train()  # a PEFT config object
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, cfg)  # prompt + classifier copy
    trained = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trained, lr=0.05)
    losses = []
    for _ in range(5):
        loss = _out(gm(**batch))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(gm.get_parameter("classifier.weight"), model.classifier.weight)  # the base head is frozen


def test_text_init_from_the_tokenizer_output_is_peft_s_and_its_file_loads_in_peft(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "classify", "the", "review"]  # a local word-level tokenizer: PEFT loads it by path
    tok = Tokenizer(models.WordLevel({w: 7 * i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(tmp_path / "tok"))
    text = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "classify the review",
            "tokenizer_name_or_path": str(tmp_path / "tok")}
    ids = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))(text["prompt_tuning_init_text"])["input_ids"]
    assert ids == [7, 14, 21]
    model, traced = _padded("llama")
    for nv in (NV, 2):  # the text's ids repeated to NV rows, or cut
        pm = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                num_virtual_tokens=nv, **text))
        gm = fxpeft.rewrite(copy.deepcopy(traced), fxpeft.PromptTuningConfig(
            num_virtual_tokens=nv, prompt_tuning_init_token_ids=ids, **text))
        (table,) = [p for p in gm.parameters() if p.requires_grad]
        assert torch.equal(table, pm.prompt_encoder["default"].embedding.weight)
    fxpeft.save_adapter(gm, tmp_path / "fx")
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert {k: config[k] for k in text} == text  # PEFT's TEXT settings written back
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    assert torch.equal(back.prompt_encoder["default"].embedding.weight, table)
