"""Trainable tokens against PEFT 0.21: the method (``TrainableTokensConfig``) and LoRA's ``trainable_token_indices``
(list and dict forms), files both ways with the same outputs on a tiny Llama and on GPT-2 (``wte`` tied to
``lm_head``), the exact fold, training that moves only the chosen rows, PEFT's parameter counts, and typed refusals
that leave the graph unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    assert_unchanged,
    out_tensor,
    peft_counts,
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
from safetensors.torch import load_file

import fxpeft
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.trainable_tokens import TrainableTokensAdapter

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),  # deepcopy of an export graph
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),  # PEFT on transformers 5
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set:UserWarning")]  # PEFT on GPT-2

IDS = [1, 5, 7, 200]


def _run(gm, name: str) -> torch.Tensor:
    _, args, kwargs, _ = _base(name)
    return out_tensor(gm(*args, **{k: v for k, v in kwargs.items() if k != "use_cache"}))


def _adapters(gm) -> list[TrainableTokensAdapter]:
    return [m for m in fxpeft.adapters(gm).values() if isinstance(m, TrainableTokensAdapter)]


CASES = {
    "llama-method": ("llama", lambda: peft.TrainableTokensConfig(token_indices=IDS, init_weights=False)),
    "gpt2-method-tied": ("gpt2", lambda: peft.TrainableTokensConfig(token_indices=IDS, init_weights=False)),
    "llama-lora-list": ("llama", lambda: peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False, trainable_token_indices=IDS)),
    "llama-lora-dict": ("llama", lambda: peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                         trainable_token_indices={"embed_tokens": IDS})),
    "gpt2-lora-list-tied": ("gpt2", lambda: peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False,
                                                            trainable_token_indices=IDS)),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_fxpeft_files_are_interchangeable(case, tmp_path):
    base, make = CASES[case]
    model = _base(base)[0]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), make()).eval()
    with torch.no_grad():  # LoRA's token rows start as the embedding's: move them, so the rows are tested
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = _run_model(pm, base)
    assert rel_err(ref, _run_model(model, base)) > 1e-2  # the adapter really changes the outputs

    gm = fxpeft.load_adapter(_graph(base), tmp_path / "peft")  # PEFT -> fxpeft
    got = _run(gm.eval(), base)
    assert rel_err(got, ref) <= 1e-5
    assert fxpeft.get_nb_trainable_parameters(gm) == pm.get_nb_trainable_parameters()

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    assert rel_err(_run_model(pm2, base), got) <= 1e-5
    ours, theirs = load_file(tmp_path / "fx" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    if "method" in case:
        assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == IDS
    else:
        assert config["peft_type"] == "LORA" and list(config["trainable_token_indices"].values()) == [IDS]
    again = fxpeft.load_adapter(_graph(base), tmp_path / "fx")  # fxpeft's own round trip
    assert torch.equal(_run(again.eval(), base), got)


def test_file_layout_and_tied_head():
    gm = fxpeft.rewrite(_graph("gpt2"), fxpeft.TrainableTokensConfig(token_indices=IDS))
    emb, head = sorted(_adapters(gm), key=lambda m: m.kind)
    assert (emb.site_name, emb.tied, head.site_name, head.tied) == ("transformer.wte", False, "lm_head", True)
    assert head.trainable_tokens_delta is emb.trainable_tokens_delta  # one parameter, counted once
    assert "lm_head_adapted_weight" in gm.code and "index_copy" in gm.code  # the head reads W' too
    gm = _graph("llama")
    code = gm.code
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": IDS}),
                   "tok")
    (m,) = _adapters(gm)
    assert m.site_name == "model.embed_tokens" and m.adapter_name == "tok" and m.companion
    assert fxpeft.adapter_names(gm) == ["tok"] and len(fxpeft.adapters(gm)) == 3  # 2 LoRA sites + the tokens
    fxpeft.delete_adapter(gm, "tok")  # one name: LoRA and its tokens go together
    assert gm.code == code and not fxpeft.adapters(gm)


@pytest.mark.parametrize("base", ["llama", "gpt2"])
def test_peft_config_objects_work_and_counts_equal_peft(base):
    model = _base(base)[0]
    for cfg in (peft.TrainableTokensConfig(token_indices=IDS),
                peft.LoraConfig(r=2, target_modules=["c_attn" if base == "gpt2" else "q_proj"],
                                trainable_token_indices=IDS)):
        gm = fxpeft.rewrite(_graph(base), copy.deepcopy(cfg))
        assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, cfg)
        assert torch.equal(_run(gm.eval(), base), _run(_base(base)[3], base))  # rows start as the embedding's


def test_zero_init_is_exactly_the_base_and_switching_is_exact():
    base = _run(_base("llama")[3], "llama")
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.TrainableTokensConfig(token_indices=IDS))
    assert torch.equal(_run(gm, "llama"), base)
    with torch.no_grad():
        _adapters(gm)[0].trainable_tokens_delta.add_(1.0)
    assert rel_err(_run(gm, "llama"), base) > 1e-2
    with fxpeft.disable_adapters(gm):
        assert torch.equal(_run(gm, "llama"), base)


@pytest.mark.filterwarnings("ignore:merge:UserWarning")
@pytest.mark.parametrize("base", ["llama", "gpt2"])
def test_merge_is_exact_and_unmerge_restores(base):
    gm = fxpeft.rewrite(_graph(base), fxpeft.TrainableTokensConfig(token_indices=IDS, init_weights=False))
    want = _run(gm.eval(), base)
    if base == "llama":  # merge_adapter / unmerge: rows written in and the originals back, bit for bit
        w = gm.get_parameter("model.embed_tokens.weight")
        before = w.detach().clone()
        fxpeft.merge_adapter(gm)
        assert torch.equal(_run(gm, base), want)
        assert torch.equal(w[IDS], _adapters(gm)[0].trainable_tokens_delta.detach())
        fxpeft.unmerge_adapter(gm)
        assert torch.equal(w, before) and torch.equal(_run(gm, base), want)
    else:  # the tied weight: merge_adapter would change both sites in place; merge unties (both get the rows)
        with pytest.raises(fxpeft.MergeError, match="tied"):
            fxpeft.merge_adapter(gm)
    merged = fxpeft.merge(gm)
    assert not fxpeft.adapters(merged) and "index_copy" not in merged.code
    assert torch.equal(_run(merged, base), want)


def test_training_moves_only_the_chosen_rows_and_lowers_the_loss():
    torch.manual_seed(0)
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.LoraConfig(r=2, target_modules=["q_proj"],
                                                            trainable_token_indices=IDS)).train()
    ids = _base("llama")[2]["input_ids"].clone()
    ids[:, ::3] = 5  # the chosen tokens occur in the batch
    w0 = gm.get_parameter("model.embed_tokens.weight").detach().clone()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        logits = out_tensor(gm(input_ids=ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    merged = fxpeft.merge(gm).get_parameter("model.embed_tokens.weight")
    others = [i for i in range(w0.shape[0]) if i not in IDS]
    assert torch.equal(merged[others], w0[others])  # every other row bit-identical
    assert not torch.equal(merged[5], w0[5])  # a trained row moved


def _bad(gm, config, error, match):
    snap = snapshot(gm)
    with pytest.raises(error, match=match):
        fxpeft.rewrite(gm, config)
    assert_unchanged(gm, snap)


def test_typed_refusals_leave_the_graph_unchanged():
    gm = _graph("llama")
    tt = fxpeft.TrainableTokensConfig
    _bad(gm, tt(token_indices=[3, 256]), fxpeft.ConfigError, r"outside the vocabulary.*256 rows")
    _bad(gm, tt(token_indices=[3, 3]), fxpeft.ConfigError, "more than once")
    _bad(gm, tt(token_indices=[-1]), fxpeft.ConfigError, "negative")
    _bad(gm, tt(token_indices=[]), fxpeft.ConfigError, "empty")
    _bad(gm, tt(token_indices=[1], target_modules=["q_proj"]), fxpeft.UnsupportedSiteError, "share no weight")
    _bad(gm, tt(token_indices=[1], target_modules=["lm_head"]), fxpeft.UnsupportedSiteError, "share no weight")
    _bad(gm, fxpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 1]), fxpeft.ConfigError,
         "trainable_token_indices.*more than once")
    _bad(gm, fxpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [999]}),
         fxpeft.ConfigError, "outside the vocabulary")  # LoRA's part went in first: rolled back too
    _bad(gm, fxpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices={"nope": [1]}),
         fxpeft.TargetError, "nope")
    _bad(gm, fxpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1], modules_to_save=["embed_tokens"]),
         fxpeft.UnsupportedSiteError, "modules_to_save")  # PEFT: whole or a few rows, not both
    cnn = _graph("cnn")
    _bad(cnn, tt(token_indices=[1], target_modules=["conv1"]), fxpeft.UnsupportedSiteError, "not conv")


def test_bert_default_target_is_the_input_embedding_and_symbolic_trace_graphs_work():
    gm = fxpeft.rewrite(_graph("bert"), fxpeft.TrainableTokensConfig(token_indices=[2, 9]))
    assert [m.site_name for m in _adapters(gm)] == ["embeddings.word_embeddings"]
    torch.manual_seed(0)
    emb = torch.nn.Sequential(torch.nn.Embedding(12, 4, padding_idx=0))
    ids = torch.tensor([[0, 3, 7, 3], [5, 3, 0, 1]])
    for gm in (fxpeft.trace(emb), fxpeft.trace(emb, (ids,))):  # call_module, and the aten call
        gm = fxpeft.rewrite(gm, fxpeft.TrainableTokensConfig(token_indices=[3, 0], init_weights=False))
        (m,) = _adapters(gm)
        want = emb[0].weight.detach().index_copy(0, torch.tensor([3, 0]), m.trainable_tokens_delta.detach())[ids]
        assert torch.equal(gm(ids), want)
        gm(ids).sum().backward()  # the padding row gets no gradient, as in nn.Embedding
        assert m.trainable_tokens_delta.grad[1].abs().sum() == 0 and m.trainable_tokens_delta.grad[0].abs().sum() > 0
