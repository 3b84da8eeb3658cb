"""SHiRA against PEFT 0.21: files both ways with the same outputs, PEFT's random mask to the bit, the weight the call
reads (``W`` with the values added at their positions), a symbolic_trace graph, fold/unfold and merge, training, and
typed refusals that leave the graph unchanged."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import (
    assert_unchanged,
    lm_train_losses,
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
from torch import nn

import fxpeft
from fxpeft import zoo
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.registry import PeftRegistry

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # deepcopy of an export graph

FIELDS = dict(r=2, random_seed=4, target_modules=["q_proj", "v_proj", "down_proj"])


@torch.no_grad()
def _run(gm, name: str = "llama") -> torch.Tensor:
    _, args, kwargs, _ = _base(name)
    return out_tensor(gm(*args, **{k: v for k, v in kwargs.items() if k != "use_cache"}))


@pytest.mark.filterwarnings("ignore")
def test_peft_and_fxpeft_shira_files_are_interchangeable(tmp_path):
    model = _base("llama")[0]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.ShiraConfig(init_weights=False, **FIELDS)).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = _run_model(pm, "llama")
    assert rel_err(ref, _run_model(model, "llama")) > 1e-3  # the adapter really changes the outputs

    gm = fxpeft.load_adapter(_graph("llama"), tmp_path / "peft")  # PEFT -> fxpeft
    got = _run(gm.eval())
    assert rel_err(got, ref) <= 1e-5

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    assert rel_err(_run_model(pm2, "llama"), got) <= 1e-5
    ours, theirs = load_file(tmp_path / "fx" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert {k.rsplit(".", 1)[1] for k in ours} == {"shira_weight", "shira_indices"}
    assert all(ours[k].dtype == torch.int32 for k in ours if k.endswith("shira_indices"))
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert (config["peft_type"], config["r"], config["random_seed"], config["mask_type"]) == ("SHIRA", 2, 4, "random")

    again = fxpeft.load_adapter(_graph("llama"), tmp_path / "fx")  # fxpeft -> fxpeft: bit-exact
    assert torch.equal(_run(again.eval()), got)
    assert fxpeft.get_nb_trainable_parameters(again)[0] == pm.get_nb_trainable_parameters()[0]

    # a rewrite draws PEFT's positions, bit for bit; then the same values give PEFT's outputs
    fresh = fxpeft.rewrite(_graph("llama"), fxpeft.ShiraConfig(**FIELDS))
    for ad in fxpeft.adapters(fresh).values():
        layer = pm.base_model.model.get_submodule(ad.site_name)
        assert torch.equal(torch.stack([ad.rows, ad.cols]).int(), layer.shira_indices["default"]), ad.site_name
        with torch.no_grad():
            ad.weight.copy_(layer.shira_weight["default"])
    assert rel_err(_run(fresh.eval()), ref) <= 1e-5


def test_the_call_reads_the_sparse_update_zero_init_and_a_peft_config_object_works():
    model = _base("llama")[0]
    cfg = peft.ShiraConfig(r=1, target_modules=["q_proj", "down_proj"])  # PEFT's default: zero init
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    assert torch.equal(_run(gm), _run(_graph("llama")))  # zero-init: exactly the base
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == peft_counts(model, cfg)[0]
    code = gm.code
    assert "q_proj_adapted_weight = torch.ops.aten.index_put.default(model_layers_0_self_attn_q_proj_weight" in code
    assert re.search(r"linear\.default\(\w+, model_layers_0_self_attn_q_proj_adapted_weight\)", code)


@pytest.mark.filterwarnings("ignore")
def test_symbolic_trace_graph_adds_the_update_to_the_output_as_peft(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(3, 16)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.ShiraConfig(r=2, target_modules=["0", "2"],
                                                                     init_weights=False))
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(copy.deepcopy(model)), tmp_path)  # call_module sites: y + linear(x, ΔW)
    with torch.no_grad():
        got, ref = gm.eval()(x), pm.eval()(x)
    assert "index_put" in gm.code and rel_err(got, ref) <= 1e-5 and rel_err(ref, model(x)) > 1e-3


def test_hot_swap_replaces_values_and_positions_in_place(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(3, 16)
    other = fxpeft.rewrite(fxpeft.trace(model, (x,)), fxpeft.ShiraConfig(r=2, target_modules=["0", "2"],
                                                                        random_seed=9, init_weights=False))
    fxpeft.save_adapter(other, tmp_path)
    gm = fxpeft.rewrite(fxpeft.trace(model, (x,)), fxpeft.ShiraConfig(r=2, target_modules=["0", "2"]))
    code = gm.code
    fxpeft.hotswap_adapter(gm, tmp_path)
    with torch.no_grad():
        assert gm.code == code and torch.equal(gm(x), other(x))
    wider = fxpeft.rewrite(fxpeft.trace(model, (x,)), fxpeft.ShiraConfig(r=3, target_modules=["0", "2"]))
    snap = snapshot(wider)
    with pytest.raises(fxpeft.AdapterFileError):  # another r: other shapes, no hot-swap
        fxpeft.hotswap_adapter(wider, tmp_path)
    assert_unchanged(wider, snap)


def test_fold_then_unfold_restores_the_weight_and_merge_matches():
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.ShiraConfig(init_weights=False, **FIELDS)).eval()
    method = PeftRegistry.get("shira")
    sites = fxpeft.find_sites(gm)
    for ad in fxpeft.adapters(gm).values():
        site = sites[ad.site_name]
        w = gm.get_parameter(site.weight).detach().float()
        folded, _ = method.fold(ad, site, w, None)
        assert int((folded != w).sum()) == ad.weight.numel()  # sparse: exactly the n positions change
        back, _ = method.unfold(ad, site, folded, None)
        assert rel_err(back, w) <= 1e-6
    want = _run(gm)
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm), want) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    with fxpeft.disable_adapters(gm):
        assert rel_err(_run(gm), _run(_graph("llama"))) <= 1e-6
    assert rel_err(_run(fxpeft.merge(gm)), want) <= 1e-5


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.ShiraConfig(**FIELDS))
    losses = lm_train_losses(gm, "llama", steps=4, lr=2e-2)
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for n, p in gm.named_parameters() if "shira_" not in n)  # the base stays frozen


def test_bf16_base_keeps_an_fp32_adapter_as_peft(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.ShiraConfig(r=2, target_modules=["0", "2"],
                                                                     init_weights=False))
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(model, (x,)), tmp_path)
    assert all(p.dtype == torch.float32 for n, p in gm.named_parameters() if "shira_" in n)
    with torch.no_grad():
        got, ref = gm(x), pm(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) <= 1e-2 and rel_err(ref, model(x)) > 1e-2


@pytest.mark.filterwarnings("ignore")
def test_refusals_are_typed_and_leave_the_graph_unchanged(tmp_path):
    gm = _graph("llama")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="embedding"):
        fxpeft.rewrite(gm, fxpeft.ShiraConfig(r=1, target_modules=["embed_tokens", "q_proj"]))
    bad = [dict(r=0), dict(r=1.5), dict(mask_type="my_custom_mask"), dict(random_seed=-1), dict(random_seed="0"),
           dict(init_weights="zeros"), dict(r=40)]  # q_proj is 64x64: r=40 asks for 5120 > 4096 entries
    for fields in bad:
        with pytest.raises(fxpeft.ConfigError):
            fxpeft.rewrite(gm, fxpeft.ShiraConfig(target_modules=["q_proj"], **{"r": 1, **fields}))
    # a PEFT file made with a custom mask function: refused on load, typed, nothing changed
    pm = peft.get_peft_model(copy.deepcopy(_base("llama")[0]), peft.ShiraConfig(r=1, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "mask_type": "my_custom_mask"}))
    with pytest.raises(fxpeft.AdapterFileError, match="mask_type"):
        fxpeft.load_adapter(gm, tmp_path)
    assert_unchanged(gm, snap)
    flm, fargs, _ = zoo.functional_lm()
    with pytest.raises(fxpeft.UnsupportedSiteError, match=r"\[in, out\]"):  # x @ W (as HF Conv1D): PEFT refuses it
        fxpeft.rewrite(fxpeft.trace(flm, fargs), fxpeft.ShiraConfig(r=1, target_modules=["blocks.0.w_out"]))
    cnn, cargs, _ = zoo.cnn()
    with pytest.raises(fxpeft.UnsupportedSiteError, match="conv"):
        fxpeft.rewrite(fxpeft.trace(cnn, cargs), fxpeft.ShiraConfig(r=1, target_modules=["conv1"]))
