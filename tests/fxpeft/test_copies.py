"""Full copies (``fxpeft/copies.py``): ``modules_to_save`` and the modules a ``task_type`` adds, against PEFT 0.21.2
on tiny sequence classifiers (Llama's ``score``, BERT's ``classifier`` with a bias); the lifecycle with several
adapters; training; bad input."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from conftest import assert_unchanged, out_tensor, rel_err, snapshot
from safetensors.torch import load_file

import fxpeft
from fxpeft import zoo
from fxpeft.copies import FullCopy

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")


def _llama_cls():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                      num_labels=3)
    return LlamaForSequenceClassification(cfg).eval(), {"input_ids": torch.randint(1, 256, (2, 16)), "use_cache": False}


def _bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=128, num_labels=3)
    ids = torch.randint(1, 256, (2, 16))
    return BertForSequenceClassification(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


_MODELS = {"llama": (_llama_cls, ["q_proj", "v_proj"]), "bert": (_bert_cls, ["query", "value"])}


@functools.lru_cache(maxsize=None)
def _base(name: str):
    model, kwargs = _MODELS[name][0]()
    return model, kwargs, fxpeft.trace(model, (), kwargs)


def _run(m, kwargs) -> torch.Tensor:
    if isinstance(m, torch.fx.GraphModule):
        kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
    with torch.no_grad():
        return out_tensor(m(**kwargs))


def _perturb(pm, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("name", list(_MODELS))
def test_task_head_round_trips_with_peft(name, tmp_path):
    model, kwargs, traced = _base(name)
    cfg = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=_MODELS[name][1], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    _perturb(pm)
    pm.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load_adapter(copy.deepcopy(traced), tmp_path / "peft")
    want = _run(pm, kwargs)
    assert rel_err(_run(gm, kwargs), want) <= 1e-5
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == pm.get_nb_trainable_parameters()[0]
    (head,) = [m for m in fxpeft.adapters(gm).values() if isinstance(m, FullCopy)]
    assert head.owner == ("score" if name == "llama" else "classifier")

    fxpeft.save_adapter(gm, tmp_path / "fx")
    config = json.loads((tmp_path / "fx" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == [head.owner]
    assert set(load_file(tmp_path / "fx" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fx")
    assert rel_err(_run(again, kwargs), want) <= 1e-5
    assert rel_err(_run(fxpeft.merge(gm), kwargs), want) <= 1e-5


def test_fxpeft_trains_the_head_as_peft_does(tmp_path):
    model, kwargs, traced = _base("llama")
    cfg = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    gm = fxpeft.rewrite(copy.deepcopy(traced), fxpeft.LoraConfig(**cfg))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == pm.get_nb_trainable_parameters()[0]
    assert not gm.get_parameter("score.weight").requires_grad  # the base head is frozen, its copy trains
    labels = torch.tensor([0, 2])
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    gm.train()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(gm(input_ids=kwargs["input_ids"]).logits, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    gm.eval()
    fxpeft.save_adapter(gm, tmp_path)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert rel_err(_run(again, kwargs), _run(gm, kwargs)) <= 1e-5


@pytest.fixture()
def two(tmp_path):
    """PEFT with two SEQ_CLS adapters (each its own copy of ``score``), and the same two loaded into a graph."""
    model, kwargs, traced = _base("llama")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(task_type="SEQ_CLS", r=4,
                                                                    target_modules=["q_proj"], init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["v_proj"], init_lora_weights=False))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(tmp_path)  # default in tmp_path, b in tmp_path/b
    gm = fxpeft.load_adapter(copy.deepcopy(traced), tmp_path)
    fxpeft.load_adapter(gm, tmp_path / "b", "b")
    return model, kwargs, traced, gm, pm


def test_switching_adapters_switches_copies_like_peft(two):
    model, kwargs, traced, gm, pm = two
    code = gm.code
    for active in ("default", "b"):
        fxpeft.set_adapter(gm, active), pm.set_adapter(active)
        assert rel_err(_run(gm, kwargs), _run(pm, kwargs)) <= 1e-5
        assert fxpeft.get_nb_trainable_parameters(gm)[0] == pm.get_nb_trainable_parameters()[0]
        with fxpeft.disable_adapters(gm):
            assert torch.equal(_run(gm, kwargs), _run(traced, kwargs))
    assert gm.code == code  # switching is a buffer write
    with pytest.raises(fxpeft.ConfigError, match="both save 'score'"):  # PEFT: ValueError, one at a time
        fxpeft.set_adapter(gm, ["default", "b"])
    assert fxpeft.active_adapters(gm) == ["b"]


def test_merge_unmerge_delete_and_unload_with_copies(two):
    model, kwargs, traced, gm, pm = two
    fxpeft.set_adapter(gm, "b"), pm.set_adapter("b")
    want = _run(pm, kwargs)
    base = gm.get_parameter("score.weight").detach().clone()
    fxpeft.merge_adapter(gm)
    copy_b = gm.get_submodule("score.copy_b")
    assert torch.equal(gm.get_parameter("score.weight"), copy_b.values.weight)
    assert rel_err(_run(gm, kwargs), want) <= 1e-5
    with fxpeft.disable_adapters(gm):  # a merged copy is taken out and put back
        assert rel_err(_run(gm, kwargs), _run(traced, kwargs)) <= 1e-6
    fxpeft.unmerge_adapter(gm)
    assert torch.equal(gm.get_parameter("score.weight"), base)
    with pytest.raises(fxpeft.ConfigError, match="unmerge"):
        fxpeft.merge_adapter(gm), fxpeft.delete_adapter(gm, "b")
    fxpeft.unmerge_adapter(gm)

    merged = fxpeft.merge(copy.deepcopy(gm))  # the copy becomes the head
    assert rel_err(_run(merged, kwargs), _run(copy.deepcopy(pm).merge_and_unload(), kwargs)) <= 1e-5
    assert not fxpeft.adapters(merged) and merged.code == traced.code
    # unload gives the base graph (PEFT's unload keeps the active adapter's copy instead); the weights are the
    # unmerged ones (fp32 subtraction)
    assert rel_err(_run(fxpeft.unload(copy.deepcopy(gm)), kwargs), _run(traced, kwargs)) <= 1e-6
    fxpeft.delete_adapter(gm, "b")
    fxpeft.delete_adapter(gm, "default")
    assert gm.code == traced.code and not fxpeft.adapters(gm)


def test_peft_suffix_rule_for_modules_to_save():
    """PEFT matches ``modules_to_save`` as a plain suffix: ``norm`` also saves every ``*_layernorm``."""
    model, args, kwargs = zoo.tiny_llama()
    cfg = dict(r=4, target_modules=["q_proj"], modules_to_save=["norm"])
    gm = fxpeft.rewrite(fxpeft.trace(model, args, kwargs), fxpeft.LoraConfig(**cfg))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    owners = sorted(m.owner for m in fxpeft.adapters(gm).values() if isinstance(m, FullCopy))
    assert len(owners) == 5 and "model.layers.0.input_layernorm" in owners
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == pm.get_nb_trainable_parameters()[0]


def test_bad_modules_to_save_leave_the_graph_unchanged():
    model, kwargs, traced = _base("llama")
    for cfg, error, match in [
        (dict(modules_to_save=["classifier_head"]), fxpeft.TargetError, "matches no module"),
        (dict(task_type="QUESTION_ANS"), fxpeft.TargetError, r"qa_outputs.*task_type"),
        (dict(modules_to_save=["proj"]), fxpeft.TargetError, "both a target and"),  # q_proj ends with "proj"
        (dict(modules_to_save=["model.layers.0", "0.mlp"]), fxpeft.ConfigError, "inside it"),
    ]:
        gm = copy.deepcopy(traced)
        snap = snapshot(gm)
        with pytest.raises(error, match=match):
            fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["q_proj"], **cfg))
        assert_unchanged(gm, snap)


def test_tied_and_opaque_modules_are_refused():
    model, args, kwargs = zoo.tiny_gpt2()  # lm_head is tied to wte
    gm = fxpeft.trace(model, args, kwargs)
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="tied"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    assert_unchanged(gm, snap)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    gm = fxpeft.trace(net)  # symbolic_trace: the modules are called opaquely
    with pytest.raises(fxpeft.UnsupportedSiteError, match="opaque"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    gm = fxpeft.trace(net, (torch.randn(3, 4),))  # with example inputs: works
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    assert gm.get_submodule("2.copy_default").values.bias.requires_grad


def test_ia3_saves_the_head_too(tmp_path):
    model, kwargs, traced = _base("bert")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(
        task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
        init_ia3_weights=False))
    _perturb(pm)
    pm.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load_adapter(copy.deepcopy(traced), tmp_path / "peft")
    want = _run(pm, kwargs)
    assert rel_err(_run(gm, kwargs), want) <= 1e-5
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == pm.get_nb_trainable_parameters()[0]
    fxpeft.save_adapter(gm, tmp_path / "fx")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fx")
    assert rel_err(_run(again, kwargs), want) <= 1e-5


def test_features_without_a_copy_form_refuse_clearly(tmp_path):
    model, kwargs, traced = _base("llama")
    gm = fxpeft.rewrite(copy.deepcopy(traced), fxpeft.LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]), "b")
    fxpeft.save_adapter(gm, tmp_path)
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="mixed-batch"):
        fxpeft.mixed_batch(gm)
    with pytest.raises(fxpeft.ConfigError, match="full copies"):
        fxpeft.add_weighted_adapter(gm, ["default", "b"], [0.5, 0.5], "ab")
    with pytest.raises(fxpeft.AdapterFileError, match="hot-swapping"):
        fxpeft.hotswap_adapter(gm, tmp_path)
    assert_unchanged(gm, snap)


def test_peft_bias_all_with_a_saved_head_loads(tmp_path):
    """PEFT's ``bias="all"`` also saves the head wrapper's insides (``classifier.original_module.bias``, and a
    ``classifier.modules_to_save.bias`` it cannot load back itself); fxpeft reads the file as PEFT does."""
    model, kwargs, traced = _base("bert")
    cfg = dict(task_type="SEQ_CLS", r=2, target_modules=["query"], bias="all", init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    _perturb(pm)
    pm.save_pretrained(tmp_path)
    assert "base_model.model.classifier.original_module.bias" in load_file(tmp_path / "adapter_model.safetensors")
    gm = fxpeft.load_adapter(copy.deepcopy(traced), tmp_path)
    assert rel_err(_run(gm, kwargs), _run(pm, kwargs)) <= 1e-5
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == pm.get_nb_trainable_parameters()[0]
