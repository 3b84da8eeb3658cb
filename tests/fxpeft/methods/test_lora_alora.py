"""aLoRA (``LoraConfig(alora_invocation_tokens=...)``) against PEFT 0.21: files both ways with the same outputs on
batches whose rows hold the invocation at different positions (twice, at the very end) or not at all; outputs before
the invocation exactly the base model's; the in-graph offsets against PEFT's ``calculate_alora_offsets``;
torch.compile with fullgraph; PEFT's ``alora_offsets`` passed in; mixed batches of aLoRA and plain LoRA rows;
training; and the typed refusals (merge, bad tokens, sites)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_unchanged, lm_train_losses, peft_counts, rel_err, snapshot
from conftest import traced_base as _base
from conftest import traced_copy as _graph
from safetensors.torch import load_file

import fxpeft
from fxpeft.errors import ConfigError, MergeError, UnsupportedSiteError
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.lora import alora_mask

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

INV = [7, 8, 9]
_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _ids(rows: list[list[int]], seed: int = 3) -> torch.Tensor:
    """A [2, 16] batch of ids >= 10 with the invocation written at each row's given starts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 256, (2, 16), generator=g)
    for r, starts in enumerate(rows):
        for s in starts:
            ids[r, s:s + len(INV)] = torch.tensor(INV)
    return ids


#: row 0 invoked at 3; row 1 twice (the last one counts); then a row without it and one invoked at the very end
BATCHES = [_ids([[3], [5, 10]]), _ids([[], [13]], seed=4)]


def _peft_alora(tmp_path, **extra):
    model = _base("llama")[0]
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=_TARGETS, init_lora_weights=False,
                          alora_invocation_tokens=INV, task_type="CAUSAL_LM", **extra)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    return model, pm


@torch.no_grad()
def _logits(m, ids):
    return m(input_ids=ids).logits


def test_peft_alora_files_load_both_ways_with_the_same_outputs(tmp_path):
    model, pm = _peft_alora(tmp_path)
    gm = fxpeft.load_adapter(_graph("llama"), tmp_path / "peft").eval()  # PEFT -> fxpeft
    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    for ids in BATCHES:
        ref, base, got = _logits(pm, ids), _logits(model, ids), _logits(gm, ids)
        assert rel_err(ref, base) > 1e-3  # the adapter acts
        assert rel_err(got, ref) <= 1e-5
        assert rel_err(_logits(pm2, ids), got) <= 1e-5
        for row in range(2):  # before the last invocation (everywhere, without one): exactly the base model
            hit = [s for s in range(14) if ids[row, s:s + 3].tolist() == INV]
            start = hit[-1] if hit else 16
            assert torch.equal(got[row, :start], base[row, :start])
            if hit:
                assert not torch.equal(got[row, start:], base[row, start:])
    assert json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())["alora_invocation_tokens"] == INV
    ours, theirs = load_file(tmp_path / "fx" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fxpeft_rewrite_with_a_peft_config_loads_in_peft(tmp_path):
    model = _base("llama")[0]
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"], init_lora_weights=False,
                          alora_invocation_tokens=INV[:2], task_type="CAUSAL_LM")
    gm = fxpeft.rewrite(_graph("llama"), cfg).eval()
    fxpeft.save_adapter(gm, tmp_path / "fx")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    for ids in BATCHES:
        assert rel_err(_logits(gm, ids), _logits(pm, ids)) <= 1e-5
    assert rel_err(_logits(gm, BATCHES[0]), _logits(model, BATCHES[0])) > 1e-3


def test_in_graph_offsets_match_peft_calculate_alora_offsets():
    from peft.tuners.lora.variants import calculate_alora_offsets

    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([2, 3])
    ids = torch.randint(0, 4, (64, 9), generator=g)  # a small alphabet: many rows with 0, 1 or several hits
    ids[0] = 0  # none
    ids[1, -2:] = tokens  # at the very end
    offsets = calculate_alora_offsets({"a": peft.LoraConfig(alora_invocation_tokens=[2, 3])}, "a", ids)
    T = ids.shape[1]  # PEFT's convention: offset counted back from the end of the row, padding included
    want = torch.stack([torch.arange(T) >= T - (o or 0) for o in offsets])
    assert torch.equal(alora_mask(ids, tokens)[..., 0], want)
    assert {o is None for o in offsets} == {True, False}


def test_zero_init_is_exactly_the_base_and_training_lowers_the_loss_with_peft_counts():
    model, _, kwargs, _ = _base("llama")
    ids = kwargs["input_ids"]
    inv = ids[0, 4:6].tolist()  # present in row 0 of the training batch: the adapter gets gradients
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.LoraConfig(r=4, target_modules=_TARGETS, alora_invocation_tokens=inv))
    with torch.no_grad():
        assert torch.equal(gm(input_ids=ids).logits, _base("llama")[3](input_ids=ids).logits)
    pc = peft.LoraConfig(r=4, target_modules=_TARGETS, alora_invocation_tokens=inv, task_type="CAUSAL_LM")
    assert sum(p.numel() for p in gm.parameters() if p.requires_grad) == peft_counts(model, pc)[0]
    losses = lm_train_losses(gm)
    assert losses[-1] < losses[0]


def test_torch_compile_fullgraph_and_a_pt2_export_compute_the_offsets_in_the_graph(tmp_path):
    _peft_alora(tmp_path)
    gm = fxpeft.load_adapter(_graph("llama"), tmp_path / "peft").eval()
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    for ids in BATCHES:
        assert rel_err(_logits(compiled, ids), _logits(gm, ids)) <= 1e-6
    ids = BATCHES[0]
    # the optional alora_offsets input is a keyword of the graph: None among the example inputs (computed in the .pt2)
    example = {"input_ids": ids, "use_cache": False, "alora_offsets": None}
    ep = torch.export.export(gm, (), example)
    assert any(n.target is torch.ops.aten.unfold.default for n in ep.graph.nodes)  # the offsets are the .pt2's ops
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    with torch.no_grad():  # a .pt2 finds each batch's offsets too
        got = loaded(input_ids=BATCHES[1], use_cache=False, alora_offsets=None).logits
    assert rel_err(got, _logits(gm, BATCHES[1])) <= 1e-6


def test_gpt2_conv1d_sites_on_flattened_tokens_match_peft(tmp_path):
    model = _base("gpt2")[0]
    torch.manual_seed(2)
    cfg = peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False, fan_in_fan_out=True,
                          alora_invocation_tokens=INV, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(_graph("gpt2"), tmp_path).eval()
    for ids in BATCHES:
        assert rel_err(_logits(gm, ids), _logits(pm, ids)) <= 1e-5


def test_merge_and_merge_adapter_are_refused_with_the_graph_unchanged(tmp_path):
    _peft_alora(tmp_path)
    gm = fxpeft.load_adapter(_graph("llama"), tmp_path / "peft").eval()
    snap = snapshot(gm)
    for merge in (fxpeft.merge, fxpeft.merge_adapter):
        with pytest.raises(MergeError, match="not a weight delta"):
            merge(gm)
        assert_unchanged(gm, snap)


@pytest.mark.parametrize("fields,error,match", [
    (dict(alora_invocation_tokens=[]), ConfigError, "non-empty"),
    (dict(alora_invocation_tokens=[3, -1]), ConfigError, "non-empty"),
    (dict(alora_invocation_tokens=["7"]), ConfigError, "token ids"),
    (dict(alora_invocation_tokens=[7, 256]), ConfigError, "outside the vocabulary"),
    (dict(alora_invocation_tokens=INV, use_dora=True), ConfigError, "use_dora"),
    (dict(alora_invocation_tokens=INV, target_modules=["embed_tokens"]), UnsupportedSiteError, "linear layers only"),
])
def test_bad_alora_configs_are_typed_errors_with_the_graph_unchanged(fields, error, match):
    gm = _graph("llama")
    snap = snapshot(gm)
    with pytest.raises(error, match=match):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(**{"target_modules": ["q_proj"], **fields}))
    assert_unchanged(gm, snap)


def test_a_graph_without_input_ids_is_refused():
    gm = _graph("cnn")  # no token input: nothing to find the invocation in
    snap = snapshot(gm)
    with pytest.raises(UnsupportedSiteError, match="input_ids"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(target_modules=["fc"], alora_invocation_tokens=INV))
    assert_unchanged(gm, snap)


def test_offsets_passed_in_match_the_graph_and_peft(tmp_path):
    """``alora_offsets=`` (PEFT's convention: counted back from the end of the row, padding included; 0 for none)
    replaces the in-graph offsets: PEFT's own offsets give the graph's outputs, and offsets of the caller's choice
    give PEFT's outputs for the same offsets; a float tensor is a typed error."""
    from peft.tuners.lora.variants import calculate_alora_offsets

    _, pm = _peft_alora(tmp_path)
    gm = fxpeft.load_adapter(_graph("llama"), tmp_path / "peft").eval()
    for ids in BATCHES:
        peft_offsets = calculate_alora_offsets(pm.peft_config, "default", ids)
        given = torch.tensor([o or 0 for o in peft_offsets])
        with torch.no_grad():
            assert torch.equal(gm(input_ids=ids, alora_offsets=given).logits, _logits(gm, ids))
    ids, chosen = BATCHES[1], [5, 16]  # row 0 has no invocation: activated from T - 5 on anyway; row 1 everywhere
    with torch.no_grad():
        got = gm(input_ids=ids, alora_offsets=torch.tensor(chosen)).logits
        assert rel_err(got, pm(input_ids=ids, alora_offsets=chosen).logits) <= 1e-5
    assert torch.equal(alora_mask(ids, torch.tensor(INV), torch.tensor(chosen))[:, :, 0].sum(1), torch.tensor(chosen))
    with pytest.raises(fxpeft.errors.InputShapeError, match="alora_offsets"):
        gm(input_ids=ids, alora_offsets=torch.tensor([1.0, 2.0]))


def test_mixed_batch_of_alora_and_plain_lora_rows_matches_each_row_alone(tmp_path):
    """adapter_names per row: aLoRA rows (each from its own invocation, or not at all), a plain LoRA row and a base
    row in one batch, each equal to the row run alone with its adapter; the twin exports with the offsets in it."""
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.LoraConfig(r=2, target_modules=_TARGETS, init_lora_weights=False,
                                                          alora_invocation_tokens=INV))
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False,
                                         alora_invocation_tokens=INV[1:]), "other")
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "plain")
    gm.eval()
    ids = torch.cat([BATCHES[0], BATCHES[1]])  # invoked at 3, at 10 (twice), none, at 13
    names = ["default", "other", "default", "plain"]
    with torch.no_grad():
        out = gm(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            fxpeft.set_adapter(gm, name)
            alone = gm(input_ids=ids[row:row + 1]).logits[0]
            assert rel_err(out[row], alone) <= 1e-5, (row, name)
        base = gm(input_ids=ids, adapter_names=["__base__"] * 4).logits
    assert torch.equal(out[2], base[2])  # an aLoRA row without its invocation is the base model's
    assert not torch.equal(out[3], base[3])


def test_mixed_batch_of_alora_and_plain_lora_matches_peft_adapter_names(tmp_path):
    """The same mixed batch in PEFT (its ``adapter_names=`` forward, its per-row offsets): the same outputs."""
    model = _base("llama")[0]
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.LoraConfig(r=2, target_modules=_TARGETS, init_lora_weights=False,
                                                          alora_invocation_tokens=INV))
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "plain")
    for name in ("default", "plain"):
        fxpeft.save_adapter(gm, tmp_path / name, adapter_name=name)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "default"))
    pm.load_adapter(str(tmp_path / "plain"), adapter_name="plain")
    pm.eval(), gm.eval()
    ids = torch.cat([BATCHES[0], BATCHES[1]])
    names = ["plain", "default", "default", "default"]  # the aLoRA rows: invoked at 10 (twice), none, at 13
    with torch.no_grad():
        ours = gm(input_ids=ids, adapter_names=names).logits
        assert rel_err(ours, pm(input_ids=ids, adapter_names=names).logits) <= 1e-5


def test_mixed_batch_rows_with_offsets_passed_in():
    """A mixed batch reads ``alora_offsets`` too: the same outputs as the offsets it would compute."""
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False,
                                                          alora_invocation_tokens=INV))
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), "plain")
    ids = BATCHES[0]
    with torch.no_grad():
        want = gm(input_ids=ids, adapter_names=["plain", "default"]).logits
        got = gm(input_ids=ids, adapter_names=["plain", "default"], alora_offsets=torch.tensor([0, 16 - 10])).logits
    assert torch.equal(got, want)


def test_hot_swapping_between_alora_and_plain_lora_is_refused(tmp_path):
    plain = fxpeft.rewrite(_graph("llama"), fxpeft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    fxpeft.save_adapter(plain, tmp_path / "plain")
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=INV))
    snap = snapshot(gm)
    with pytest.raises(fxpeft.AdapterFileError, match="alora_invocation_tokens"):
        fxpeft.hotswap_adapter(gm, tmp_path / "plain")
    assert_unchanged(gm, snap)


def test_sites_share_one_mask_per_call_and_an_edited_input_gets_a_new_one():
    from fxpeft.methods.lora import alora_on
    from fxpeft.scope import CallScope

    ids, tokens = torch.tensor([[1, 5, 6, 2], [5, 6, 3, 4]]), torch.tensor([5, 6])
    with CallScope():  # one graph call: its sites share the first site's mask
        first = alora_on(ids, tokens, None)
        assert alora_on(ids, tokens.clone(), None) is first  # another site's copy of the tokens: the same mask
        assert torch.equal(first, torch.tensor([[False, True, True, True], [True, True, True, True]]))
        ids[0, 1] = 9  # edited in place: the kept mask is stale
        assert torch.equal(alora_on(ids, tokens, None), torch.tensor([[False] * 4, [True] * 4]))
        offsets = torch.tensor([1, 0])  # PEFT's offsets: the last token of row 0, none of row 1
        assert torch.equal(alora_on(ids, tokens, offsets), torch.tensor([[False, False, False, True], [False] * 4]))
    assert alora_on(ids, tokens, None) is not alora_on(ids, tokens, None)  # outside a call: nothing is kept
    # the next call sees a write that autograd's version counter misses (through .data, or a shared numpy array)
    ids.data[0, 1] = 5
    with CallScope():
        assert torch.equal(alora_on(ids, tokens, None), torch.tensor([[False, True, True, True], [True] * 4]))
    with torch.inference_mode(), CallScope():  # inference tensors keep no version counter: computed, not kept
        ids = torch.tensor([[1, 5, 6, 2]])
        assert torch.equal(alora_on(ids, tokens, None), torch.tensor([[False, True, True, True]]))
        ids[0, 1] = 9
        assert not alora_on(ids, tokens, None).any()


def test_a_graph_call_shares_the_mask_across_its_sites_and_a_reused_buffer_is_read_again(tmp_path):
    import numpy as np

    _peft_alora(tmp_path)
    gm = fxpeft.load_adapter(_graph("llama"), tmp_path / "peft").eval()
    buf = BATCHES[0].numpy().copy()
    ids = torch.from_numpy(buf)  # a loader refilling one buffer: writes that torch's version counter does not see
    with torch.no_grad():
        for batch in BATCHES:  # both [2, 16], invoked at different places
            np.copyto(buf, batch.numpy())
            assert torch.equal(_logits(gm, ids), _logits(gm, batch.clone()))
