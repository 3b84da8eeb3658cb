"""Adaption prompt against PEFT 0.21: files both ways with the same logits and loss on a tiny GQA Llama and GPT-2
(left and right padding, other batch sizes and lengths through the same graph), exactly the base while the gate is
0 or the adapter disabled, PEFT's trainable count, training, removal back to the base code, a PEFT config object,
and typed refusals (merge included) that leave the graph unchanged."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from conftest import assert_unchanged, out_tensor, peft_counts, rel_err, snapshot
from conftest import traced_base as _base
from conftest import traced_copy as _graph
from safetensors.torch import load_file

import fxpeft
from fxpeft import zoo
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.adaption_prompt import AdaptionPromptAdapter

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),  # deepcopy of an export graph
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]  # PEFT, transformers 5

LEN = 3
ATTN = {"llama": "model.layers.{}.self_attn", "gpt2": "transformer.h.{}.attn"}


def _batch(batch: int = 2, seq: int = 10, seed: int = 3) -> dict[str, torch.Tensor]:
    """Row 0 left-padded, row 1 right-padded (the rest unpadded); labels -100 on the padding."""
    torch.manual_seed(seed)
    ids = torch.randint(1, 256, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    if batch > 1:
        mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@functools.cache
def _padded(name: str):
    """(model, graph traced with input_ids, attention_mask and labels) of a 2-layer zoo model, once per module."""
    model = getattr(zoo, f"tiny_{name}")(layers=2)[0]
    return model, fxpeft.trace(model, (), {**_batch(), "use_cache": False})


def _out(out):
    """(loss, logits) of a graph's or PEFT's output."""
    return (out["loss"], out["logits"]) if isinstance(out, dict) else (out.loss, out.logits)


def _gates(module: torch.nn.Module, value: float) -> None:
    """Open every adaption gate (0 at init, which would hide the prompt)."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n.endswith("adaption_gate"):
                p.fill_(value)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_files_load_with_the_same_logits_and_loss_and_fxpeft_files_load_in_peft(name, tmp_path):
    model, traced = _padded(name)
    cfg = peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=LEN, adapter_layers=1)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    _gates(pm, 0.8)
    pm.save_pretrained(str(tmp_path / "peft"))
    gm = fxpeft.load_adapter(copy.deepcopy(traced), tmp_path / "peft").eval()  # PEFT -> fxpeft
    # one graph, several batch sizes and lengths (dynamic dims), left and right padding
    for batch in (_batch(), _batch(3, 7, seed=4), _batch(1, 12, seed=5)):
        with torch.no_grad():
            ref_loss, ref = _out(pm(**batch))
            loss, logits = _out(gm(**batch))
            base = model(**batch).logits
        assert rel_err(logits, ref) <= 1e-5 and rel_err(loss, ref_loss) <= 1e-5
        assert rel_err(logits, base) > 1e-2  # the prompt really changes the outputs

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    saved, theirs = (load_file(str(tmp_path / d / WEIGHTS_NAME)) for d in ("fx", "peft"))
    top = f"base_model.model.{ATTN[name].format(1)}"
    assert saved.keys() == theirs.keys() == {f"{top}.adaption_prompt", f"{top}.adaption_gate"}
    assert all(torch.equal(saved[k], theirs[k]) for k in saved)
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "ADAPTION_PROMPT" and config["target_modules"] == ATTN[name].rsplit(".", 1)[1]
    assert (config["adapter_len"], config["adapter_layers"]) == (LEN, 1)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    batch = _batch()
    with torch.no_grad():
        back_loss, back_logits = _out(back(**batch))
        ref_loss, ref = _out(pm(**batch))
    assert rel_err(back_logits, ref) <= 1e-5 and rel_err(back_loss, ref_loss) <= 1e-5


def test_fxpeft_adapter_loads_in_peft_zero_gate_and_disabled_are_exactly_the_base(tmp_path):
    model, traced = _padded("llama")
    batch = _batch()
    gm = fxpeft.rewrite(copy.deepcopy(traced), fxpeft.AdaptionPromptConfig(adapter_len=LEN, adapter_layers=2)).eval()
    with torch.no_grad():
        base_loss, base = _out(traced(**batch))
        loss, logits = _out(gm(**batch))
        assert torch.equal(logits, base) and torch.equal(loss, base_loss)  # the gate starts at 0
        _gates(gm, -0.6)
        fxpeft.save_adapter(gm, tmp_path)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
        loss, logits = _out(gm(**batch))
        ref_loss, ref = _out(pm(**batch))
        assert rel_err(logits, ref) <= 1e-5 and rel_err(loss, ref_loss) <= 1e-5 and rel_err(logits, base) > 1e-2
        with fxpeft.disable_adapters(gm):
            off_loss, off = _out(gm(**batch))
        assert torch.equal(off, base) and torch.equal(off_loss, base_loss)
        assert torch.equal(_out(gm(**batch))[1], logits)  # back on


def test_peft_config_object_on_the_is_causal_gqa_form_counts_training_and_removal_back_to_the_base_code(tmp_path):
    model, _, kwargs, traced = _base("llama")  # traced without a mask: SDPA with is_causal and grouped K/V
    sdpa = [n for n in traced.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert all(n.args[3:] == (None, 0.0, True) and n.kwargs["enable_gqa"] for n in sdpa)
    cfg = peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2)
    gm = fxpeft.rewrite(_graph("llama"), copy.deepcopy(cfg))
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, cfg)
    trained = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    assert sorted(trained.values()) == [(1,), (1,), (1, 4, 64), (1, 4, 64)]  # only prompts and gates
    ads = [m for m in fxpeft.adapters(gm).values() if isinstance(m, AdaptionPromptAdapter)]
    assert sorted(m.site_name for m in ads) == [f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)]
    # reads as the edit it is: the query attends to the prompt's keys, gated, projected and added to o_proj's output
    assert "model_layers_1_self_attn_o_proj_prompt_probs_gated = torch.ops.aten.mul.Tensor" in gm.code
    assert "model_layers_1_self_attn_o_proj_with_prompt = torch.ops.aten.add.Tensor(linear_" in gm.code

    ids = kwargs["input_ids"]
    _gates(gm, 0.7)
    fxpeft.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        assert rel_err(out_tensor(gm(input_ids=ids)), pm(input_ids=ids).logits) <= 1e-5
    _gates(gm, 0.0)
    frozen = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=0.05)
    losses = []
    gm.train()
    for _ in range(5):  # next-token loss; the gates open from 0 in the first step
        logits = out_tensor(gm(input_ids=ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in gm.named_parameters() if n in frozen)
    fxpeft.delete_adapter(gm, "default")
    assert gm.code == traced.code


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_is_refused_with_the_graph_unchanged(name):
    gm = fxpeft.rewrite(copy.deepcopy(_padded(name)[1]), fxpeft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    _gates(gm, 0.5)
    snap = snapshot(gm)
    for merge in (fxpeft.merge_adapter, fxpeft.merge):
        with pytest.raises(fxpeft.errors.MergeError, match="no weight change to fold"):
            merge(gm)
        assert_unchanged(gm, snap)


def test_typed_refusals_leave_the_graph_unchanged(tmp_path):
    gm = copy.deepcopy(_padded("llama")[1])
    snap = snapshot(gm)
    bad = [({"adapter_len": 0, "adapter_layers": 1}, fxpeft.ConfigError, "adapter_len must be a positive"),
           ({"adapter_len": -1, "adapter_layers": 1}, fxpeft.ConfigError, "adapter_len must be a positive"),
           ({"adapter_len": 2}, fxpeft.ConfigError, "adapter_layers must be a positive"),
           ({"adapter_len": 2, "adapter_layers": 3}, fxpeft.errors.TargetError, "exceeds the 2 attention layer"),
           ({"adapter_len": 2, "adapter_layers": 1, "target_modules": "mlp"}, fxpeft.errors.TargetError,
            "names no attention module"),
           ({"adapter_len": 2, "adapter_layers": 1, "modules_to_save": ["lm_head"]}, fxpeft.ConfigError,
            "modules_to_save")]
    for fields, error, match in bad:
        with pytest.raises(error, match=match):
            fxpeft.rewrite(gm, fxpeft.AdaptionPromptConfig(**fields))
        assert_unchanged(gm, snap)

    # a PEFT file of a 3-layer Llama's top 3 layers does not fit a 2-layer graph
    deep = zoo.tiny_llama(layers=3)[0]
    pm = peft.get_peft_model(deep, peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=2, adapter_layers=3))
    pm.save_pretrained(str(tmp_path / "deep"))
    with pytest.raises(fxpeft.errors.AdapterFileError, match="exceeds the 2 attention layer"):
        fxpeft.load_adapter(gm, tmp_path / "deep")
    assert_unchanged(gm, snap)
    # its top layer's tensors sit under layers.2, which the 2-layer graph's top layer is not
    config = json.loads((tmp_path / "deep" / CONFIG_NAME).read_text())
    (tmp_path / "deep" / CONFIG_NAME).write_text(json.dumps({**config, "adapter_layers": 1}))
    with pytest.raises(fxpeft.errors.AdapterFileError):
        fxpeft.load_adapter(gm, tmp_path / "deep")
    assert_unchanged(gm, snap)

    cnn = _graph("cnn")  # no attention node
    snap = snapshot(cnn)
    with pytest.raises(fxpeft.errors.UnsupportedSiteError, match="no attention node"):
        fxpeft.rewrite(cnn, fxpeft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    assert_unchanged(cnn, snap)


@pytest.mark.filterwarnings("ignore:adaption prompt. the output projections:UserWarning")
def test_model_agnostic_on_a_bert_encoder_and_a_file_reloads_bit_exact(tmp_path):
    """PEFT has no adaption prompt for BERT; the graph edit needs none: the attention node's projections are found."""
    _, _, kwargs, traced = _base("bert")
    with pytest.warns(UserWarning, match="have a bias"):  # PEFT would add the output projection's bias twice
        gm = fxpeft.rewrite(_graph("bert"), fxpeft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1)).eval()
    (ad,) = [m for m in fxpeft.adapters(gm).values() if isinstance(m, AdaptionPromptAdapter)]
    assert ad.site_name == "encoder.layer.1.attention.output.dense"
    assert ad.attention_path == "encoder.layer.1.attention.self"
    with torch.no_grad():
        base = out_tensor(traced(**kwargs))
        assert torch.equal(out_tensor(gm(**kwargs)), base)
        _gates(gm, 0.5)
        got = out_tensor(gm(**kwargs))
    assert rel_err(got, base) > 1e-3
    fxpeft.save_adapter(gm, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"] == "self"
    again = fxpeft.load_adapter(_graph("bert"), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(out_tensor(again(**kwargs)), got)


def test_a_lora_on_the_weights_the_prompt_reads_is_not_merged():
    # the prompt's K/V go through k_proj/v_proj's weights: folding a LoRA there would change them, so the merged
    # graph would not compute what the unmerged one does. Refused, the graph unchanged; a LoRA elsewhere merges.
    gm = fxpeft.rewrite(copy.deepcopy(_padded("llama")[1]), fxpeft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1),
                        adapter_name="ap")
    _gates(gm, 0.5)
    for name, targets in (("kv", ["k_proj", "v_proj"]), ("q", ["q_proj", "gate_proj"])):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False), adapter_name=name)
    fxpeft.set_adapter(gm, ["ap", "kv", "q"])  # added adapters start inactive (PEFT's add_adapter)
    snap = snapshot(gm)
    for merge in (fxpeft.merge_adapter, fxpeft.passes.MergeAdapters(("kv",))):
        with pytest.raises(fxpeft.errors.MergeError, match=r"adapter 'ap' \(adaption_prompt\) at .*o_proj"):
            merge(gm, adapter_names=["kv"]) if merge is fxpeft.merge_adapter else merge(gm)
        assert_unchanged(gm, snap)
    batch = _batch()
    with torch.no_grad():
        want = _out(gm(**batch))[1]
        fxpeft.merge_adapter(gm, adapter_names=["q"])
        assert rel_err(_out(gm(**batch))[1], want) <= 1e-5
        # merge_and_unload removes the prompt too (as PEFT's does every adapter it does not merge): then k/v fold
        alone = copy.deepcopy(gm)
        fxpeft.unmerge_adapter(alone)
        fxpeft.delete_adapter(alone, "ap")
        fxpeft.set_adapter(alone, ["kv", "q"])
        want = _out(alone(**batch))[1]
        assert rel_err(_out(fxpeft.merge(gm, adapter_names=["kv", "q"])(**batch))[1], want) <= 1e-5


def test_a_prompt_added_after_a_merged_lora_unmerges_and_disables():
    # the prompt was built on the merged weights: unmerging or disabling (and re-folding on exit) is not refused
    batch = _batch()
    base = _out(copy.deepcopy(_padded("llama")[1])(**batch))[1]
    gm = fxpeft.rewrite(copy.deepcopy(_padded("llama")[1]),
                        fxpeft.LoraConfig(r=2, target_modules=["k_proj", "v_proj"], init_lora_weights=False), "kv")
    fxpeft.merge_adapter(gm)
    fxpeft.rewrite(gm, fxpeft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1), adapter_name="ap")
    _gates(gm, 0.5)
    fxpeft.set_adapter(gm, ["kv", "ap"])
    with torch.no_grad():
        want = _out(gm(**batch))[1]
        with fxpeft.disable_adapters(gm):
            assert rel_err(_out(gm(**batch))[1], base) <= 1e-5
        assert rel_err(_out(gm(**batch))[1], want) <= 1e-5 and all(
            m.merged for m in fxpeft.adapters(gm).values() if m.adapter_name == "kv")
        fxpeft.unmerge_adapter(gm)
