"""LoKr against PEFT 0.21: files both ways with the same outputs (linear, Conv1d with PEFT's kron quirk, Conv2d,
grouped, CP form, ``decompose_both``/``decompose_factor``, per-site patterns, either graph dialect, a bf16 base), the
linear update applied without building ΔW, fold/unfold, training, the training-only dropouts, the lifecycle, and
typed refusals that leave the graph unchanged."""

from __future__ import annotations

import copy
import json

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
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import fxpeft
from fxpeft import zoo
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.lokr import factorization
from fxpeft.registry import PeftRegistry

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # deepcopy of an export graph

_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


CASES = {  # hidden 64 = 8·8, intermediate 128 = 8·16: r=4 keeps W2 full, r=2 decomposes it
    "llama-7-projections-patterns-dropouts": ("llama", dict(
        r=4, alpha=8, target_modules=_PROJ, rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
        alpha_pattern={"o_proj": 3}, rank_dropout=0.3, module_dropout=0.2, rank_dropout_scale=True)),
    "llama-decompose-both-factor": ("llama", dict(r=1, alpha=2, target_modules=["q_proj", "down_proj"],
                                                  decompose_both=True, decompose_factor=4)),
    "llama-layers-to-transform-modules-to-save": ("llama", dict(  # generic targeting and copies
        r=2, alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], modules_to_save=["lm_head"])),
    "cnn": ("cnn", dict(r=2, alpha=6, target_modules=["conv1", "conv2", "conv3", "fc"])),
    "cnn-effective-conv2d": ("cnn", dict(r=1, alpha=3, target_modules=["conv1", "conv2", "conv3", "fc"],
                                         use_effective_conv2d=True)),
    "conv1d-full-w2-grouped": ("convs", dict(r=2, alpha=4, target_modules=["c1", "g2", "head"])),  # PEFT's quirk
    "conv1d-grouped-effective": ("convs", dict(r=1, alpha=4, target_modules=["c1", "g2", "head"],
                                               use_effective_conv2d=True)),
}


def _dense_make_kron(w1, w2, scale=1.0):
    """PEFT's ``make_kron`` with ``w2`` copied densely: PEFT 0.21.2's own raises on a Conv1d's CP form (the einsum
    result has an odd stride on its size-1 dim, which ``.contiguous()`` keeps and ``torch.kron``'s views reject)."""
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2.clone(memory_format=torch.contiguous_format)) * scale


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_fxpeft_lokr_files_are_interchangeable(case, tmp_path, monkeypatch):
    base, fields = CASES[case]
    model = _base(base)[0]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoKrConfig(init_weights=False, **fields)).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    if case == "conv1d-grouped-effective":  # PEFT cannot run it; its maths, with the dense copy, is the reference
        if peft.__version__ == "0.21.2":
            with pytest.raises(RuntimeError, match="view size"):
                _run_model(pm, base)
        monkeypatch.setattr(peft.tuners.lokr.layer, "make_kron", _dense_make_kron)
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
    assert config["peft_type"] == "LOKR"
    for k in ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "decompose_both",
              "decompose_factor", "rank_dropout_scale"):
        assert config[k] == fields.get(k, getattr(peft.LoKrConfig(), k)), k

    again = fxpeft.load_adapter(_graph(base), tmp_path / "fx")  # fxpeft -> fxpeft: bit-exact
    assert torch.equal(_run(again.eval(), base), got)
    assert fxpeft.get_nb_trainable_parameters(again)[0] == pm.get_nb_trainable_parameters()[0]


@given(st.integers(1, 600), st.sampled_from([-1, 1, 2, 3, 4, 8, 16]))
@settings(max_examples=60, deadline=None)
def test_factorization_is_peft_s(dimension, factor):
    from peft.tuners.lokr.layer import factorization as peft_factorization

    assert factorization(dimension, factor) == peft_factorization(dimension, factor)


@pytest.mark.filterwarnings("ignore")
def test_symbolic_trace_graph_loads_peft_s_file(tmp_path):
    model = _base("cnn")[0]
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoKrConfig(
        r=1, target_modules=["conv1", "conv2", "fc"], init_weights=False, use_effective_conv2d=True)).eval()
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(copy.deepcopy(model)), tmp_path)  # call_module sites: y + op(x, ΔW)
    assert rel_err(_run(gm.eval(), "cnn"), _run_model(pm, "cnn")) <= 1e-5


def test_linear_update_never_builds_delta_w_and_a_peft_config_object_works():
    model = _base("llama")[0]
    cfg = peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"])  # PEFT's default: W1 zero
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    assert torch.equal(_run(gm, "llama"), _run(_graph("llama"), "llama"))  # zero-init: exactly the base
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == peft_counts(model, cfg)[0]
    assert "aten.kron" not in gm.code and "q_proj_kron_x = torch.ops.aten.bmm.default" in gm.code
    for ad in fxpeft.adapters(gm).values():  # the factored update is (s·W1 ⊗ W2) x
        with torch.no_grad():
            ad.lokr_w1.normal_()
    x = torch.randn(3, 5, 64)
    site = fxpeft.find_sites(gm)["model.layers.0.self_attn.q_proj"]
    ad = next(a for a in fxpeft.adapters(gm).values() if a.site_name == site.name)
    sub = fxpeft.rewrite(fxpeft.trace(nn.Sequential(nn.Linear(64, 64, bias=False)), (x,)),
                         fxpeft.LoKrConfig(r=4, alpha=8, target_modules=["0"]))
    (mine,) = fxpeft.adapters(sub).values()
    mine.load_state_dict(ad.state_dict())
    want = x @ (sub.get_parameter("0.weight") + torch.kron(ad.lokr_w1, ad.lokr_w2) * 2.0).T
    assert rel_err(sub(x), want) <= 1e-5


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_zero_inits_are_exact_on_convs_in_both_dialects(init):
    model, args, _ = zoo.cnn()
    want = model(*args)
    cfg = fxpeft.LoKrConfig(r=1, target_modules=["conv1", "conv2", "conv3", "fc"], use_effective_conv2d=True,
                            decompose_both=True, init_weights=init)
    for gm in (fxpeft.trace(model, args), fxpeft.trace(model)):
        assert torch.equal(fxpeft.rewrite(gm, cfg)(*args), want)


@pytest.mark.parametrize("case", ["cnn-effective-conv2d", "conv1d-full-w2-grouped", "llama-decompose-both-factor"])
def test_fold_then_unfold_restores_the_weight_and_merge_matches(case):
    base, fields = CASES[case]
    gm = fxpeft.rewrite(_graph(base), fxpeft.LoKrConfig(init_weights=False, **fields)).eval()
    lokr = PeftRegistry.get("lokr")
    sites = fxpeft.find_sites(gm)
    for ad in fxpeft.adapters(gm).values():
        site = sites[ad.site_name]
        w = gm.get_parameter(site.weight).detach().float()
        folded, _ = lokr.fold(ad, site, w, None)
        assert not torch.equal(folded, w)
        back, _ = lokr.unfold(ad, site, folded, None)
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
    cfg = fxpeft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_dropout=0.1,
                            module_dropout=0.1)
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    losses = lm_train_losses(gm, "llama", steps=4, lr=1e-2)
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for n, p in gm.named_parameters() if "lokr_" not in n)  # the base stays frozen


def _train(gm):
    """Training mode, but for the model's own dropouts (the cnn has one): only the adapters' are random."""
    gm.train()
    for m in gm.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    return gm


@pytest.mark.parametrize("base,targets", [("llama", ["q_proj", "v_proj"]), ("cnn", ["conv1", "conv2"])])
def test_dropouts_are_training_only(base, targets):
    fields = dict(r=2, alpha=8, target_modules=targets, init_weights=False)
    torch.manual_seed(0)
    plain = fxpeft.rewrite(_graph(base), fxpeft.LoKrConfig(**fields))
    dropped = fxpeft.rewrite(_graph(base), fxpeft.LoKrConfig(rank_dropout=0.5, module_dropout=0.5,
                                                             rank_dropout_scale=True, **fields))
    for a, b in zip(fxpeft.adapters(plain).values(), fxpeft.adapters(dropped).values()):
        b.load_state_dict(a.state_dict())
    assert torch.equal(_run(dropped.eval(), base), _run(plain.eval(), base))  # eval: the identity
    _train(dropped)
    outs = [_run(dropped, base) for _ in range(3)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # training: random
    skipped = _train(fxpeft.rewrite(_graph(base), fxpeft.LoKrConfig(module_dropout=1.0, **fields)))
    assert torch.equal(_run(skipped, base), _run(_train(_graph(base)), base))  # p = 1: always skipped


def test_rank_dropout_rescales_only_when_asked():
    for rescale in (False, True):
        gm = fxpeft.rewrite(_graph("cnn"), fxpeft.LoKrConfig(r=2, target_modules=["fc"], rank_dropout=0.4,
                                                             rank_dropout_scale=rescale))
        (ad,) = fxpeft.adapters(gm).values()
        torch.manual_seed(0)
        mask = ad.rank_dropout.train()(torch.ones(3, 2000))
        kept = mask[0] != 0
        assert abs(kept.float().mean().item() - 0.6) < 0.05 and ad.rank_dropout.dim == -1
        assert torch.allclose(mask[0][kept], torch.full_like(mask[0][kept], 1 / kept.float().mean() if rescale else 1))


def test_lifecycle_switch_stack_merge_delete_and_save(tmp_path):
    base = _run(_graph("llama"), "llama")
    base_code = _base("llama")[3].code
    gm = _graph("llama")
    fxpeft.rewrite(gm, fxpeft.LoKrConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False), "a")
    fxpeft.rewrite(gm, fxpeft.LoKrConfig(r=4, alpha=5, target_modules=["q_proj"], init_weights=False), "b")
    ya = _run(gm, "llama")
    fxpeft.set_adapter(gm, "b")
    yb = _run(gm, "llama")
    with fxpeft.disable_adapters(gm):
        assert torch.equal(_run(gm, "llama"), base)
    fxpeft.set_adapter(gm, ["a", "b"])
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
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoKrConfig(r=2, target_modules=["0", "2"],
                                                                     init_weights=False))
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(model, (x,)), tmp_path)
    assert all(p.dtype == torch.float32 for n, p in gm.named_parameters() if "lokr_" in n)
    with torch.no_grad():
        got, ref = gm(x), pm(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) <= 1e-2 and rel_err(ref, model(x)) > 1e-2


def test_hot_swap_replaces_the_weights_in_place(tmp_path):
    model, args, _ = zoo.cnn()
    cfg = dict(r=1, target_modules=["conv1", "fc"], use_effective_conv2d=True, init_weights=False)
    torch.manual_seed(3)
    other = fxpeft.rewrite(fxpeft.trace(model, args), fxpeft.LoKrConfig(alpha=5, **cfg))
    fxpeft.save_adapter(other, tmp_path)
    gm = fxpeft.rewrite(fxpeft.trace(model, args), fxpeft.LoKrConfig(**cfg))
    code = gm.code
    fxpeft.hotswap_adapter(gm, tmp_path)
    assert gm.code == code and torch.equal(gm(*args), other(*args))


def test_refusals_are_typed_and_leave_the_graph_unchanged():
    gm = _graph("llama")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="embeddings"):
        fxpeft.rewrite(gm, fxpeft.LoKrConfig(target_modules=["embed_tokens", "q_proj"]))
    bad = [dict(r=0), dict(alpha=float("nan")), dict(rank_dropout=2), dict(decompose_both=1),
           dict(decompose_factor=0), dict(decompose_factor=2.0), dict(rank_dropout_scale="no"),
           dict(init_weights="gaussian"), dict(init_weights=1), dict(rank_pattern={"q_proj": -1})]
    for fields in bad:
        with pytest.raises(fxpeft.ConfigError):
            fxpeft.rewrite(gm, fxpeft.LoKrConfig(target_modules=["q_proj"], **fields))
    assert_unchanged(gm, snap)
    flm, args, _ = zoo.functional_lm()
    g = fxpeft.trace(flm, args)
    with pytest.raises(fxpeft.UnsupportedSiteError, match=r"\[in, out\]"):
        fxpeft.rewrite(g, fxpeft.LoKrConfig(target_modules=["blocks.0.w_out"]))
