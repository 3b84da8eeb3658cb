"""LoRA's own maths: fold and unfold are inverses, at the run-time scale, for every site kind."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxpeft
from fxpeft.registry import PeftRegistry


def _model(kind: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if kind == "linear":
        return torch.nn.Sequential(torch.nn.Linear(6, 5)), torch.randn(3, 6)
    if kind == "conv":
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1)), torch.randn(2, 3, 5, 5)
    return torch.nn.Sequential(torch.nn.Embedding(11, 4)), torch.randint(0, 11, (2, 5))


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(["linear", "conv", "embedding"]), r=st.integers(1, 4),
       alpha=st.floats(0.5, 32), rslora=st.booleans(), active=st.booleans())
def test_fold_then_unfold_restores_the_weight(kind, r, alpha, rslora, active):
    model, x = _model(kind)
    gm = fxpeft.rewrite(fxpeft.trace(model), fxpeft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                                                               target_modules=["0"], init_lora_weights=False))
    (ad,) = fxpeft.adapters(gm).values()
    ad.set_active(active)
    site = fxpeft.find_sites(gm)["0"]
    lora = PeftRegistry.get("lora")
    w = gm.get_parameter(site.weight).detach().float()
    folded, _ = lora.fold(ad, site, w, None)
    assert not torch.equal(folded, w)  # the fold is the adapter's, whether it is switched on or not
    back, _ = lora.unfold(ad, site, folded, None)
    torch.testing.assert_close(back, w, rtol=1e-5, atol=1e-5)
    ad.set_active(True)
    expected = gm(x).detach()
    merged = fxpeft.merge(gm)
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def test_scaling_is_a_buffer_the_graph_reads():
    model, x = _model("linear")
    gm = fxpeft.rewrite(fxpeft.trace(model), fxpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                               init_lora_weights=False))
    (ad,) = fxpeft.adapters(gm).values()
    assert ad.scaling == 2.0 and float(ad.scale) == 2.0
    base = model(x).detach()
    delta = gm(x).detach() - base
    with torch.no_grad():
        ad.scale.fill_(4.0)  # twice the scaling: twice the delta, with the same code
    torch.testing.assert_close(gm(x) - base, 2 * delta, rtol=1e-5, atol=1e-6)
