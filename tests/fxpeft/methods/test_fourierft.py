"""FourierFT against PEFT 0.21: files both ways with the same outputs (Llama with per-site patterns, GPT-2's
``Conv1D``, a symbolic_trace graph), PEFT's frequencies to the bit, the weight the call reads (``W + ΔW``),
fold/unfold and merge, training, the lifecycle, and typed refusals that leave the graph unchanged."""

from __future__ import annotations

import copy
import json

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
from fxpeft.methods.fourierft import FourierFTAdapter, spectral_indices
from fxpeft.registry import PeftRegistry

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # deepcopy of an export graph


@torch.no_grad()
def _run(gm, name: str) -> torch.Tensor:
    _, args, kwargs, _ = _base(name)
    return out_tensor(gm(*args, **{k: v for k, v in kwargs.items() if k != "use_cache"}))


CASES = {
    "llama-patterns": ("llama", dict(n_frequency=40, scaling=20.0, random_loc_seed=5,
                                     target_modules=["q_proj", "v_proj", "down_proj"],
                                     n_frequency_pattern={"v_proj": 12})),
    "gpt2-conv1d": ("gpt2", dict(n_frequency=30, scaling=10.0, target_modules=["c_attn", "mlp.c_proj"],
                                 bias="fourier_only")),  # the adapted sites' biases trained, as copies
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_fxpeft_fourierft_files_are_interchangeable(case, tmp_path):
    base, fields = CASES[case]
    model = _base(base)[0]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.FourierFTConfig(**fields)).eval()  # init: random
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
    assert all(k.endswith((".fourierft_spectrum", ".bias")) for k in ours)
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "FOURIERFT"
    for k in ("n_frequency", "scaling", "random_loc_seed", "n_frequency_pattern", "bias"):
        assert config[k] == fields.get(k, getattr(peft.FourierFTConfig(), k)), k

    again = fxpeft.load_adapter(_graph(base), tmp_path / "fx")  # fxpeft -> fxpeft: bit-exact
    assert torch.equal(_run(again.eval(), base), got)
    assert fxpeft.get_nb_trainable_parameters(again)[0] == pm.get_nb_trainable_parameters()[0]
    # the frequencies are PEFT's draws, bit for bit
    for name, ad in fxpeft.adapters(gm).items():
        if not isinstance(ad, FourierFTAdapter):
            continue  # a trained bias copy (bias="fourier_only")
        layer = pm.base_model.model.get_submodule(ad.site_name)
        assert torch.equal(torch.stack([ad.rows, ad.cols]), layer.indices["default"]), name


@pytest.mark.filterwarnings("ignore")
def test_symbolic_trace_graph_adds_the_update_to_the_output_as_peft(tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(32, 16), nn.ReLU(), nn.Linear(32, 8))  # Conv1D(nf=out, nx=in): weight [in, out]
    x = torch.randn(3, 16)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.FourierFTConfig(n_frequency=25, target_modules=["0", "2"]))
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(copy.deepcopy(model)), tmp_path)  # call_module sites: y + linear(x, ΔW)
    with torch.no_grad():
        got, ref = gm.eval()(x), pm.eval()(x)
    assert "fft_ifft2" in gm.code and rel_err(got, ref) <= 1e-5 and rel_err(ref, model(x)) > 1e-3
    fxpeft.merge_adapter(gm)
    with torch.no_grad():
        assert rel_err(gm(x), ref) <= 1e-5


def test_the_call_reads_w_plus_delta_zero_init_and_a_peft_config_object_works():
    model = _base("llama")[0]
    cfg = peft.FourierFTConfig(n_frequency=16, target_modules=["q_proj", "down_proj"], init_weights=True)
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    assert torch.equal(_run(gm, "llama"), _run(_graph("llama"), "llama"))  # zero-init: exactly the base
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == peft_counts(model, cfg)[0] == 16 * 4
    code = gm.code
    for step in ("q_proj_dense_spectrum = torch.ops.aten.index_put.default(", "fft_ifft2.default(",
                 "q_proj_ifft2_real = torch.ops.aten.real.default(",
                 "q_proj_adapted_weight = torch.ops.aten.add.Tensor(model_layers_0_self_attn_q_proj_weight"):
        assert step in code, step


def test_spectral_indices_are_peft_s_draw():
    want = torch.randperm(6 * 10, generator=torch.Generator().manual_seed(3))[:7]
    got = spectral_indices(6, 10, 7, seed=3)
    assert torch.equal(got[0] * 10 + got[1], want) and bool((got[1] < 10).all())


@pytest.mark.parametrize("base", ["llama", "gpt2"])
def test_fold_then_unfold_restores_the_weight_and_merge_matches(base):
    gm = fxpeft.rewrite(_graph(base), fxpeft.FourierFTConfig(**CASES[f"{base}-patterns" if base == "llama"
                                                                      else "gpt2-conv1d"][1])).eval()
    method = PeftRegistry.get("fourierft")
    sites = fxpeft.find_sites(gm)
    for ad in [a for a in fxpeft.adapters(gm).values() if isinstance(a, FourierFTAdapter)]:
        site = sites[ad.site_name]
        w = gm.get_parameter(site.weight).detach().float()
        folded, _ = method.fold(ad, site, w, None)
        assert not torch.equal(folded, w)
        back, _ = method.unfold(ad, site, folded, None)
        assert rel_err(back, w) <= 1e-6
    want = _run(gm, base)
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm, base), want) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    base_w = dict(_base(base)[3].named_parameters())
    for n, p in gm.named_parameters():
        if n in base_w:
            assert rel_err(p, base_w[n]) <= 1e-6, n
    assert rel_err(_run(fxpeft.merge(gm), base), want) <= 1e-5


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = fxpeft.FourierFTConfig(n_frequency=64, scaling=30.0, target_modules=["q_proj", "v_proj", "down_proj"],
                                 init_weights=True)
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    losses = lm_train_losses(gm, "llama", steps=4, lr=5e-2)
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for n, p in gm.named_parameters() if "fourierft_" not in n)  # the base stays frozen


def test_lifecycle_switch_merge_delete_and_hot_swap(tmp_path):
    base = _run(_graph("llama"), "llama")
    base_code = _base("llama")[3].code
    gm = _graph("llama")
    fxpeft.rewrite(gm, fxpeft.FourierFTConfig(n_frequency=20, scaling=30.0, target_modules=["q_proj", "v_proj"]), "a")
    fxpeft.rewrite(gm, fxpeft.FourierFTConfig(n_frequency=10, scaling=30.0, target_modules=["q_proj"]), "b")
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
    assert rel_err(_run(gm, "llama"), yb) <= 1e-6
    fxpeft.delete_adapter(gm, "b")
    assert gm.code == base_code
    # a hot-swap keeps the code: new coefficients into an adapter with the same frequencies
    torch.manual_seed(7)
    target = fxpeft.rewrite(_graph("llama"), fxpeft.FourierFTConfig(n_frequency=10, scaling=30.0,
                                                                    target_modules=["q_proj"]))
    code = target.code
    fxpeft.hotswap_adapter(target, tmp_path)
    assert target.code == code and rel_err(_run(target, "llama"), yb) <= 1e-6


def test_bf16_base_keeps_an_fp32_adapter_as_peft(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.FourierFTConfig(n_frequency=20, target_modules=["0", "2"]))
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(model, (x,)), tmp_path)
    assert all(p.dtype == torch.float32 for n, p in gm.named_parameters() if "fourierft_" in n)
    with torch.no_grad():
        got, ref = gm(x), pm(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) <= 1e-2 and rel_err(ref, model(x)) > 1e-2


def test_refusals_are_typed_and_leave_the_graph_unchanged():
    gm = _graph("llama")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="embedding"):
        fxpeft.rewrite(gm, fxpeft.FourierFTConfig(n_frequency=8, target_modules=["embed_tokens", "q_proj"]))
    bad = [dict(n_frequency=0), dict(n_frequency=2.5), dict(scaling=float("nan")), dict(random_loc_seed=None),
           dict(random_loc_seed=-1), dict(init_weights="zeros"), dict(n_frequency_pattern={"q_proj": 0}),
           dict(bias="lora_only"), dict(n_frequency=64 * 64 + 1)]  # q_proj is 64x64: at most 4096 frequencies
    for fields in bad:
        with pytest.raises(fxpeft.ConfigError):
            fxpeft.rewrite(gm, fxpeft.FourierFTConfig(target_modules=["q_proj"], **{"n_frequency": 8, **fields}))
    assert_unchanged(gm, snap)
    model, args, _ = zoo.cnn()
    g = fxpeft.trace(model, args)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="conv"):
        fxpeft.rewrite(g, fxpeft.FourierFTConfig(n_frequency=8, target_modules=["conv1"]))
