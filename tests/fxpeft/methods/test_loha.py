"""LoHa against PEFT 0.21: files both ways with the same outputs (linear, Conv1d, Conv2d, grouped, CP form, per-site
patterns, either graph dialect, a bf16 base), the weight the call reads (``W + ΔW``), fold/unfold, training, the
training-only dropouts, the lifecycle, and typed refusals that leave the graph unchanged."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import (
    assert_unchanged,
    lm_train_losses,
    peft_counts,
    rel_err,
    snapshot,
)
from conftest import (
    run_graph as _run,
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
from fxpeft.methods.loha import ModuleDropout, RankDropout
from fxpeft.registry import PeftRegistry

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # deepcopy of an export graph

_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


CASES = {
    "llama-7-projections-patterns-dropouts": ("llama", dict(
        r=4, alpha=8, target_modules=_PROJ, rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
        alpha_pattern={"o_proj": 3}, rank_dropout=0.3, module_dropout=0.2)),
    "llama-layers-to-transform-modules-to-save": ("llama", dict(  # generic targeting and copies
        r=2, alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], modules_to_save=["lm_head"])),
    "cnn": ("cnn", dict(r=3, alpha=6, target_modules=["conv1", "conv2", "conv3", "fc"])),
    "cnn-effective-conv2d": ("cnn", dict(r=3, alpha=6, target_modules=["conv1", "conv2", "conv3", "fc"],
                                         use_effective_conv2d=True)),
    "conv1d-grouped": ("convs", dict(r=2, alpha=4, target_modules=["c1", "g2", "head"])),
    "conv1d-grouped-effective": ("convs", dict(r=2, alpha=4, target_modules=["c1", "g2", "head"],
                                               use_effective_conv2d=True)),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_fxpeft_loha_files_are_interchangeable(case, tmp_path):
    base, fields = CASES[case]
    model = _base(base)[0]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoHaConfig(init_weights=False, **fields)).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = _run_model(pm, base)
    assert rel_err(ref, _run_model(model, base)) > 1e-3  # the adapter really changes the outputs

    gm = fxpeft.load_adapter(_graph(base), tmp_path / "peft")  # PEFT -> fxpeft
    got = _run(gm.eval(), base)
    assert rel_err(got, ref) <= 1e-5

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    assert rel_err(_run_model(pm2, base), got) <= 1e-5
    ours, theirs = load_file(tmp_path / "fx" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LOHA"
    for k in ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d"):
        assert config[k] == fields.get(k, getattr(peft.LoHaConfig(), k)), k

    again = fxpeft.load_adapter(_graph(base), tmp_path / "fx")  # fxpeft -> fxpeft: bit-exact
    assert torch.equal(_run(again.eval(), base), got)
    # the trainable-parameter count is PEFT's
    assert fxpeft.get_nb_trainable_parameters(again)[0] == pm.get_nb_trainable_parameters()[0]


@pytest.mark.filterwarnings("ignore")
def test_symbolic_trace_graph_adds_the_update_to_the_output_as_peft(tmp_path):
    model = _base("cnn")[0]
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoHaConfig(
        r=3, target_modules=["conv1", "conv2", "fc"], init_weights=False, use_effective_conv2d=True)).eval()
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(copy.deepcopy(model)), tmp_path)  # call_module sites: y + conv(x, ΔW)
    assert "conv2d" in gm.code and rel_err(_run(gm.eval(), "cnn"), _run_model(pm, "cnn")) <= 1e-5


def test_the_call_reads_w_plus_delta_and_a_peft_config_object_works():
    model = _base("llama")[0]
    cfg = peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"])  # PEFT's default: zero init
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    assert torch.equal(_run(gm, "llama"), _run(_graph("llama"), "llama"))  # zero-init: exactly the base
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == peft_counts(model, cfg)[0]
    code = gm.code
    assert "q_proj_adapted_weight = torch.ops.aten.add.Tensor(model_layers_0_self_attn_q_proj_weight" in code
    assert re.search(r"linear\.default\(\w+, model_layers_0_self_attn_q_proj_adapted_weight\)", code)
    assert "delta_weight = torch.ops.aten.mul.Tensor" in code


def test_zero_init_is_exact_on_convs_in_both_dialects():
    model, args, _ = zoo.cnn()
    want = model(*args)
    cfg = fxpeft.LoHaConfig(r=2, target_modules=["conv1", "conv2", "conv3", "fc"], use_effective_conv2d=True)
    for gm in (fxpeft.trace(model, args), fxpeft.trace(model)):
        assert torch.equal(fxpeft.rewrite(gm, cfg)(*args), want)


@pytest.mark.parametrize("case", ["cnn", "cnn-effective-conv2d", "conv1d-grouped-effective"])
def test_fold_then_unfold_restores_the_weight_and_merge_matches(case):
    base, fields = CASES[case]
    gm = fxpeft.rewrite(_graph(base), fxpeft.LoHaConfig(init_weights=False, **fields)).eval()
    loha = PeftRegistry.get("loha")
    sites = fxpeft.find_sites(gm)
    for ad in fxpeft.adapters(gm).values():
        site = sites[ad.site_name]
        w = gm.get_parameter(site.weight).detach().float()
        folded, _ = loha.fold(ad, site, w, None)
        assert not torch.equal(folded, w)
        back, _ = loha.unfold(ad, site, folded, None)
        assert rel_err(back, w) <= 1e-6
    want = _run(gm, base)
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm, base), want) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    base_w = {n: p for n, p in _base(base)[3].named_parameters()}
    for n, p in gm.named_parameters():
        if n in base_w:
            assert rel_err(p, base_w[n]) <= 1e-6, n
    assert rel_err(_run(fxpeft.merge(gm), base), want) <= 1e-5


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = fxpeft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_dropout=0.1,
                            module_dropout=0.1)
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    losses = lm_train_losses(gm, "llama", steps=4, lr=1e-2)
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for n, p in gm.named_parameters() if "loha_" not in n)  # the base stays frozen


def test_dropouts_are_training_only():
    fields = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    torch.manual_seed(0)
    plain = fxpeft.rewrite(_graph("llama"), fxpeft.LoHaConfig(**fields))
    dropped = fxpeft.rewrite(_graph("llama"), fxpeft.LoHaConfig(rank_dropout=0.5, module_dropout=0.5, **fields))
    for a, b in zip(fxpeft.adapters(plain).values(), fxpeft.adapters(dropped).values()):
        b.load_state_dict(a.state_dict())
    assert torch.equal(_run(dropped.eval(), "llama"), _run(plain.eval(), "llama"))  # eval: the identity
    dropped.train()
    outs = [_run(dropped, "llama") for _ in range(3)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # training: random
    skipped = fxpeft.rewrite(_graph("llama"), fxpeft.LoHaConfig(module_dropout=1.0, **fields)).train()
    assert torch.equal(_run(skipped, "llama"), _run(_graph("llama").train(), "llama"))  # p = 1: always skipped


def test_rank_dropout_statistics():
    torch.manual_seed(0)
    rd = RankDropout(0.3, rescale=True, dim=0)
    t = torch.ones(4000, 3)
    assert torch.equal(rd.eval()(t), t)
    out = rd.train()(t)
    dropped = (out[:, 0] == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.03 and abs(out.mean().item() - 1.0) < 1e-5  # kept rows / kept fraction
    assert torch.equal(RankDropout(1.0, rescale=True, dim=0).train()(t), torch.zeros_like(t))  # PEFT: NaN here
    md = ModuleDropout(0.25).train()
    kept = sum(float(md(torch.tensor(1.0))) for _ in range(4000)) / 4000
    assert abs(kept - 0.75) < 0.03 and float(md.eval()(torch.tensor(2.0))) == 2.0


def test_lifecycle_switch_stack_merge_delete_and_save(tmp_path):
    base = _run(_graph("llama"), "llama")
    base_code = _base("llama")[3].code
    gm = _graph("llama")
    fxpeft.rewrite(gm, fxpeft.LoHaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False), "a")
    fxpeft.rewrite(gm, fxpeft.LoHaConfig(r=3, alpha=5, target_modules=["q_proj"], init_weights=False), "b")
    ya = _run(gm, "llama")
    fxpeft.set_adapter(gm, "b")
    yb = _run(gm, "llama")
    with fxpeft.disable_adapters(gm):
        assert torch.equal(_run(gm, "llama"), base)
    fxpeft.set_adapter(gm, ["a", "b"])  # two updates on one weight: W + ΔW_b + ΔW_a
    yab = _run(gm, "llama")
    assert rel_err(yab, base) > 1e-3 and rel_err(yab, ya) > 1e-4 and rel_err(yab, yb) > 1e-4
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm, "llama"), yab) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    fxpeft.save_adapter(gm, tmp_path, adapter_name="b")
    fxpeft.delete_adapter(gm, "a")
    fxpeft.set_adapter(gm, "b")
    assert rel_err(_run(gm, "llama"), yb) <= 1e-6  # the unmerge restored the base weights to rounding
    assert rel_err(_run(fxpeft.load_adapter(_graph("llama"), tmp_path), "llama"), yb) <= 1e-6
    fxpeft.delete_adapter(gm, "b")
    assert gm.code == base_code


def test_bf16_base_keeps_an_fp32_adapter_as_peft(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoHaConfig(r=2, target_modules=["0", "2"],
                                                                     init_weights=False))
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(model, (x,)), tmp_path)
    assert all(p.dtype == torch.float32 for n, p in gm.named_parameters() if "loha_" in n)
    with torch.no_grad():
        got, ref = gm(x), pm(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) <= 1e-2 and rel_err(ref, model(x)) > 1e-2


def test_hot_swap_replaces_the_weights_in_place(tmp_path):
    model, args, _ = zoo.cnn()
    cfg = dict(r=2, target_modules=["conv1", "fc"], use_effective_conv2d=True, init_weights=False)
    torch.manual_seed(3)
    other = fxpeft.rewrite(fxpeft.trace(model, args), fxpeft.LoHaConfig(alpha=5, **cfg))
    fxpeft.save_adapter(other, tmp_path)
    gm = fxpeft.rewrite(fxpeft.trace(model, args), fxpeft.LoHaConfig(**cfg))
    code = gm.code
    fxpeft.hotswap_adapter(gm, tmp_path)
    assert gm.code == code and torch.equal(gm(*args), other(*args))


def test_refusals_are_typed_and_leave_the_graph_unchanged():
    gm = _graph("llama")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="embeddings"):
        fxpeft.rewrite(gm, fxpeft.LoHaConfig(target_modules=["embed_tokens", "q_proj"]))
    bad = [dict(r=0), dict(alpha="8"), dict(rank_dropout=1.5), dict(module_dropout=-0.1),
           dict(use_effective_conv2d="yes"), dict(init_weights="gaussian"), dict(rank_pattern={"q_proj": 0}),
           dict(alpha_pattern=[1])]
    for fields in bad:
        with pytest.raises(fxpeft.ConfigError):
            fxpeft.rewrite(gm, fxpeft.LoHaConfig(target_modules=["q_proj"], **fields))
    assert_unchanged(gm, snap)
    flm, args, _ = zoo.functional_lm()
    g = fxpeft.trace(flm, args)
    with pytest.raises(fxpeft.UnsupportedSiteError, match=r"\[in, out\]"):  # x @ W: PEFT has no layer for it
        fxpeft.rewrite(g, fxpeft.LoHaConfig(target_modules=["blocks.0.w_out"]))
    g3 = fxpeft.trace(nn.Sequential(nn.Conv3d(2, 3, 3)), (torch.randn(2, 2, 4, 4, 4),))
    with pytest.raises(fxpeft.UnsupportedSiteError, match="3-d convolution"):
        fxpeft.rewrite(g3, fxpeft.LoHaConfig(target_modules=["0"]))
