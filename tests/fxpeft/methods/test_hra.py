"""HRA against PEFT 0.21: files both ways with the same outputs (plain reflections and Gram–Schmidt), the reflected
weight the call reads, PEFT's symmetric init, fold/unfold and PEFT's merge, conv sites both ways, a symbolic_trace
graph, training, and typed refusals that leave the graph unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
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
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),  # deepcopy of an export graph
              pytest.mark.filterwarnings("ignore:.*is not in the common layers pattern")]

_TARGETS = ["q_proj", "v_proj", "down_proj"]


@torch.no_grad()
def _run(gm, name: str) -> torch.Tensor:
    _, args, kwargs, _ = _base(name)
    return out_tensor(gm(*args, **{k: v for k, v in kwargs.items() if k != "use_cache"}))


@pytest.mark.parametrize("apply_gs", [False, True], ids=["reflections", "gram-schmidt"])
def test_peft_and_fxpeft_hra_files_are_interchangeable(apply_gs, tmp_path):
    model = _base("llama")[0]
    torch.manual_seed(1)
    cfg = peft.HRAConfig(r=4, apply_GS=apply_gs, init_weights=False, target_modules=_TARGETS)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = _run_model(pm, "llama")
    assert rel_err(ref, _run_model(model, "llama")) > 1e-2  # the adapter really changes the outputs

    gm = fxpeft.load_adapter(_graph("llama"), tmp_path / "peft")  # PEFT -> fxpeft
    got = _run(gm.eval(), "llama")
    assert rel_err(got, ref) <= 1e-5

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    assert rel_err(_run_model(pm2, "llama"), got) <= 1e-5
    ours, theirs = load_file(tmp_path / "fx" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(k.endswith(".hra_u") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "HRA" and config["r"] == 4 and config["apply_GS"] is apply_gs

    again = fxpeft.load_adapter(_graph("llama"), tmp_path / "fx")  # fxpeft -> fxpeft: bit-exact
    assert torch.equal(_run(again.eval(), "llama"), got)
    assert fxpeft.get_nb_trainable_parameters(again)[0] == pm.get_nb_trainable_parameters()[0]


def test_peft_config_object_symmetric_init_and_the_call_reads_the_reflected_weight():
    model = _base("llama")[0]
    cfg = peft.HRAConfig(r=4, target_modules=["q_proj", "down_proj"])  # PEFT's default: pairs of equal vectors
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    base = _run(_graph("llama"), "llama")
    # a reflection twice is the identity: the base up to rounding (PEFT's init is not bit-exact either)
    assert rel_err(_run(gm, "llama"), base) <= 1e-6
    ad = next(iter(fxpeft.adapters(gm).values()))
    assert torch.equal(ad.hra_u[:, 0::2], ad.hra_u[:, 1::2]) and ad.hra_u.abs().sum() > 0
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == peft_counts(model, cfg)[0]
    code = gm.code
    assert "q_proj_reflected_weight_3 = torch.ops.aten.addmm.default(" in code  # one addmm per vector
    assert "linear.default(" in code and "q_proj_reflected_weight_3)" in code  # the call reads W' itself

    torch.manual_seed(0)
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.HRAConfig(r=3, target_modules=["q_proj"], init_weights=False))
    assert rel_err(_run(gm, "llama"), base) > 1e-3
    with fxpeft.disable_adapters(gm):  # off: every reflection is the identity, exactly
        assert torch.equal(_run(gm, "llama"), base)


@pytest.mark.parametrize("apply_gs", [False, True], ids=["reflections", "gram-schmidt"])
def test_fold_then_unfold_restores_the_weight_and_merge_is_peft_merge(apply_gs, tmp_path):
    model = _base("llama")[0]
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.HRAConfig(
        r=6, apply_GS=apply_gs, target_modules=_TARGETS, init_weights=False)).eval()
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(_graph("llama"), tmp_path).eval()
    hra, sites = PeftRegistry.get("hra"), fxpeft.find_sites(gm)
    for ad in fxpeft.adapters(gm).values():
        site = sites[ad.site_name]
        w = gm.get_parameter(site.weight).detach().float()
        folded, _ = hra.fold(ad, site, w, None)
        assert rel_err(folded, w) > 1e-2
        back, _ = hra.unfold(ad, site, folded, None)  # each reflection undoes itself, in reverse order
        assert rel_err(back, w) <= 1e-6
    want = _run(gm, "llama")
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm, "llama"), want) <= 1e-5
    theirs = dict(pm.merge_and_unload().named_parameters())  # PEFT's exact fold W·∏Hᵢ
    for ad in fxpeft.adapters(gm).values():
        name = sites[ad.site_name].weight
        assert rel_err(gm.get_parameter(name), theirs[name]) <= 1e-6, name
    fxpeft.unmerge_adapter(gm)
    for n, p in _base("llama")[3].named_parameters():
        assert rel_err(gm.get_parameter(n), p) <= 1e-6, n
    assert rel_err(_run(fxpeft.merge(gm), "llama"), want) <= 1e-5


@pytest.mark.parametrize("dialect", ["export", "fx"])
def test_conv_sites_match_peft_both_ways(dialect, tmp_path):
    model, (x,), _, _ = _base("cnn")
    torch.manual_seed(4)
    cfg = peft.HRAConfig(r=4, target_modules=["conv1", "conv3", "fc"], init_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        ref = pm(x)
        assert rel_err(ref, model(x)) > 1e-3
    g = _graph("cnn") if dialect == "export" else fxpeft.trace(copy.deepcopy(model))  # fx: call_module sites
    gm = fxpeft.load_adapter(g, tmp_path / "peft").eval()
    assert ("conv1_delta_weight" in gm.code) == (dialect == "fx")  # no weight value to replace: y + conv(x, W'-W)
    with torch.no_grad():
        got = gm(x)
    assert rel_err(got, ref) <= 1e-5
    assert {k: tuple(v.shape) for k, v in load_file(tmp_path / "peft" / WEIGHTS_NAME).items()} == {
        "base_model.model.conv1.hra_u": (27, 4), "base_model.model.conv3.hra_u": (32, 4),
        "base_model.model.fc.hra_u": (32, 4)}  # in·k·k
    fxpeft.save_adapter(gm, tmp_path / "fx")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        assert rel_err(pm2(x), got) <= 1e-5
    fxpeft.merge_adapter(gm)
    with torch.no_grad():
        assert rel_err(gm(x), ref) <= 1e-5


# (not Gram–Schmidt on the symmetric init: the second vector of each pair is orthogonalised down to rounding noise,
# in PEFT too)
@pytest.mark.parametrize("fields", [dict(), dict(apply_GS=True, init_weights=False)], ids=["default", "gs-random"])
def test_a_few_steps_lower_the_loss_and_the_base_stays_frozen(fields):
    torch.manual_seed(0)
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.HRAConfig(r=4, target_modules=_TARGETS, **fields))
    losses = lm_train_losses(gm, "llama", steps=4, lr=1e-2)
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for n, p in gm.named_parameters() if "hra_u" not in n)


def test_refusals_are_typed_and_leave_the_graph_unchanged():
    gm = _graph("llama")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="embedding"):
        fxpeft.rewrite(gm, fxpeft.HRAConfig(target_modules=["embed_tokens", "q_proj"]))
    for fields in [dict(r=0), dict(r=2.0), dict(r=True), dict(apply_GS="yes"), dict(init_weights="symmetric"),
                   dict(bias="all")]:
        with pytest.raises(fxpeft.ConfigError):
            fxpeft.rewrite(gm, fxpeft.HRAConfig(target_modules=["q_proj"], **fields))
    with pytest.raises(fxpeft.UnsupportedSiteError, match="Gram–Schmidt"):  # 65 vectors over 64 features
        fxpeft.rewrite(gm, fxpeft.HRAConfig(r=65, apply_GS=True, target_modules=["q_proj"]))
    assert_unchanged(gm, snap)
    with pytest.warns(UserWarning, match="even r"):  # PEFT's symmetric init needs pairs: random vectors instead
        fxpeft.rewrite(_graph("llama"), fxpeft.HRAConfig(r=3, target_modules=["q_proj"]))

    flm, args, _ = zoo.functional_lm()
    with pytest.raises(fxpeft.UnsupportedSiteError, match=r"\[in, out\]"):  # x @ W (as HF Conv1D): no PEFT layer
        fxpeft.rewrite(fxpeft.trace(flm, args), fxpeft.HRAConfig(target_modules=["blocks.0.w_out"]))
    cnn = _graph("cnn")
    snap = snapshot(cnn)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="dilat"):
        fxpeft.rewrite(cnn, fxpeft.HRAConfig(target_modules=["conv2"]))
    assert_unchanged(cnn, snap)
    g3 = fxpeft.trace(nn.Sequential(nn.Conv3d(2, 3, 3)), (torch.randn(2, 2, 4, 4, 4),))
    with pytest.raises(fxpeft.UnsupportedSiteError, match="3-d convolution"):
        fxpeft.rewrite(g3, fxpeft.HRAConfig(target_modules=["0"]))


def test_a_conv_with_per_axis_stride_warns_that_peft_computes_it_differently(tmp_path):
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=(1, 2), padding=1)).eval()
    x = torch.randn(2, 2, 6, 6)
    torch.manual_seed(0)
    gm = fxpeft.rewrite(fxpeft.trace(model, (x,)), fxpeft.HRAConfig(r=2, target_modules=["0"], init_weights=False))
    hra, site = PeftRegistry.get("hra"), fxpeft.find_sites(gm)["0"]
    ad = next(iter(fxpeft.adapters(gm).values()))
    ref = F.conv2d(x, hra.fold(ad, site, model[0].weight.detach(), None)[0], model[0].bias, (1, 2), 1)
    with torch.no_grad():
        assert rel_err(gm(x), ref) <= 1e-6  # fxpeft keeps the conv's own stride
    with pytest.warns(UserWarning, match="stride"):
        fxpeft.save_adapter(gm, tmp_path)


def test_a_bf16_base_adds_the_fp32_update_and_still_merges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).to(torch.bfloat16).eval()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    gm = fxpeft.rewrite(fxpeft.trace(model, (x,)), fxpeft.HRAConfig(r=2, init_weights=False, target_modules=["0"]))
    ad = next(iter(fxpeft.adapters(gm).values()))
    assert ad.hra_u.dtype == torch.float32 and "0_delta_weight" in gm.code  # y + linear(x, W' - W), in fp32
    with torch.no_grad():
        want = F.linear(torch.relu(F.linear(x.float(), ad.reflect(model[0].weight.float()), model[0].bias.float())),
                        model[2].weight.float(), model[2].bias.float())
        y = gm(x)
        assert y.dtype == torch.bfloat16 and rel_err(y.float(), want) <= 2e-2
        fxpeft.merge_adapter(gm)  # the fp32 read beside the call is not a second call site of the weight
        assert rel_err(gm(x).float(), y.float()) <= 2e-2
