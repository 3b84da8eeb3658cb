"""LoRA's trained-bias fields against PEFT 0.21.2: ``bias="all"`` / ``"lora_only"`` (per-adapter copies of the base
biases, ``fxpeft/copies.py``) and ``lora_bias=True`` (a bias on B), both directions, merges and training."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import assert_unchanged, out_tensor, rel_err, snapshot
from safetensors.torch import load_file

import fxpeft
from fxpeft import zoo

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")

_ZOO = {"gpt2": zoo.tiny_gpt2, "llama": zoo.tiny_llama}


@functools.lru_cache(maxsize=None)
def _base(name: str):
    model, args, kwargs = _ZOO[name]()
    return model, kwargs, fxpeft.trace(model, args, kwargs)


def _run(m, kwargs) -> torch.Tensor:
    if isinstance(m, torch.fx.GraphModule):
        kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
    with torch.no_grad():
        return out_tensor(m(**kwargs))


CASES = {  # GPT-2's Conv1D sites and layer norms have biases; tiny Llama's q/v projections have none
    "gpt2-bias-all": ("gpt2", dict(target_modules=["c_attn"], bias="all")),
    "gpt2-bias-lora-only": ("gpt2", dict(target_modules=["c_attn", "c_fc"], bias="lora_only")),
    "gpt2-lora-bias": ("gpt2", dict(target_modules=["c_attn", "c_fc"], lora_bias=True)),
    "gpt2-all-and-lora-bias": ("gpt2", dict(target_modules=["c_proj"], bias="all", lora_bias=True)),
    "llama-lora-bias-no-base-bias": ("llama", dict(target_modules=["q_proj", "v_proj"], lora_bias=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_files_both_ways_and_merges(case, tmp_path):
    name, kw = CASES[case]
    model, kwargs, traced = _base(name)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking biases (PEFT initialises lora_B.bias to 0 and keeps the base biases)
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    want = _run(pm, kwargs)
    assert rel_err(want, _run(model, kwargs)) > 1e-2

    gm = fxpeft.load_adapter(copy.deepcopy(traced), tmp_path / "peft")
    assert rel_err(_run(gm, kwargs), want) <= 1e-5
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == pm.get_nb_trainable_parameters()[0]

    fxpeft.save_adapter(gm, tmp_path / "fx")
    keys = set(load_file(tmp_path / "fx" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fx")
    assert rel_err(_run(again, kwargs), want) <= 1e-5

    with fxpeft.disable_adapters(gm):  # the base biases are untouched: off is the base model exactly
        assert torch.equal(_run(gm, kwargs), _run(traced, kwargs))
    merged = fxpeft.merge(copy.deepcopy(gm))
    assert rel_err(_run(merged, kwargs), want) <= 1e-5
    if name == "llama":  # lora_bias on sites without a bias: the merge gives them one, PEFT cannot
        assert merged.get_parameter("model.layers.0.self_attn.q_proj.bias").shape == (64,)
        snap = snapshot(gm)
        with pytest.raises(fxpeft.MergeError, match="has none"):
            fxpeft.merge_adapter(gm)
        assert_unchanged(gm, snap)
    else:
        before = {n: p.detach().clone() for n, p in gm.named_parameters()}
        fxpeft.merge_adapter(gm)
        assert rel_err(_run(gm, kwargs), want) <= 1e-5
        fxpeft.unmerge_adapter(gm)
        for n, p in gm.named_parameters():
            assert rel_err(p, before[n]) <= 1e-6, n


@pytest.mark.parametrize("kw", [dict(bias="all"), dict(lora_bias=True)], ids=["bias-all", "lora-bias"])
def test_training_moves_the_trained_biases(kw, tmp_path):
    model, kwargs, traced = _base("gpt2")
    cfg = dict(r=4, lora_alpha=8, target_modules=["c_attn"], **kw)
    gm = fxpeft.rewrite(copy.deepcopy(traced), fxpeft.LoraConfig(**cfg))
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == \
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg)).get_nb_trainable_parameters()[0]
    ids = kwargs["input_ids"]
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    gm.train()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        logits = gm(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    gm.eval()
    base = {n: p for n, p in gm.named_parameters() if n.endswith(".bias") and ".copy_" not in n}
    assert base and not any(p.requires_grad for p in base.values())  # the base biases stay frozen
    fxpeft.save_adapter(gm, tmp_path)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert rel_err(_run(again, kwargs), _run(gm, kwargs)) <= 1e-5


def test_bias_copies_per_adapter():
    """Each adapter trains its own copy of a bias (PEFT trains the shared base bias)."""
    model, kwargs, traced = _base("gpt2")
    gm = copy.deepcopy(traced)
    for name in ("a", "b"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["c_fc"], bias="lora_only"), name)
    site = "transformer.h.0.mlp.c_fc"
    with torch.no_grad():
        gm.get_submodule(f"{site}.copy_a").values.bias.fill_(1.0)
        gm.get_submodule(f"{site}.copy_b").values.bias.fill_(-1.0)
    outs = {}
    for name in ("a", "b"):
        fxpeft.set_adapter(gm, name)
        outs[name] = _run(gm, kwargs)
        assert [n for n, p in gm.named_parameters() if p.requires_grad and "copy" in n][0].endswith(f"copy_{name}.values.bias")
    assert rel_err(outs["a"], outs["b"]) > 1e-3
    merged = fxpeft.merge(copy.deepcopy(gm))
    assert torch.equal(merged.get_parameter(f"{site}.bias"), torch.full((256,), -1.0))


@pytest.mark.parametrize("kw,error,match", [
    (dict(target_modules=["embed_tokens"], lora_bias=True), fxpeft.UnsupportedSiteError, "embedding"),
    (dict(target_modules=["q_proj"], lora_bias=True, init_lora_weights="gaussian"), fxpeft.ConfigError, "lora_bias"),
    (dict(target_modules=["q_proj"], bias="some"), fxpeft.ConfigError, "bias='some'"),
    (dict(target_modules=["q_proj"], lora_bias=1), fxpeft.ConfigError, "lora_bias"),
], ids=["embedding", "gaussian-init", "unknown-bias", "non-bool"])
def test_bad_bias_fields_leave_the_graph_unchanged(kw, error, match):
    gm = copy.deepcopy(_base("llama")[2])
    snap = snapshot(gm)
    with pytest.raises(error, match=match):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, **kw))
    assert_unchanged(gm, snap)
