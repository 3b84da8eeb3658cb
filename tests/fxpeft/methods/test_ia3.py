"""IA3's own maths: fold and unfold are inverses; switched off, the vector is the identity."""

from __future__ import annotations

import pytest
import torch

import fxpeft
from fxpeft.registry import PeftRegistry


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fold_unfold_and_switch_off(kind, feedforward):
    if kind == "linear":
        model, x = torch.nn.Sequential(torch.nn.Linear(6, 5)), torch.randn(3, 6)
    else:
        model, x = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 5, 5)
    ref = model(x).detach()
    gm = fxpeft.rewrite(fxpeft.trace(model, (x,)), fxpeft.IA3Config(
        target_modules=["0"], feedforward_modules=["0"] if feedforward else None, init_ia3_weights=False))
    (ad,) = fxpeft.adapters(gm).values()
    out = gm(x).detach()
    assert (out - ref).abs().max() > 1e-3
    site = fxpeft.find_sites(gm)["0"]
    ia3 = PeftRegistry.get("ia3")
    w = gm.get_parameter(site.weight).detach().float()
    b = gm.get_parameter(site.bias).detach().float()
    fw, fb = ia3.fold(ad, site, w, b)
    bw, bb = ia3.unfold(ad, site, fw, fb)
    torch.testing.assert_close(bw, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bb, b, rtol=1e-5, atol=1e-6)
    ad.set_active(False)
    assert torch.equal(gm(x), ref)
    ad.set_active(True)
    torch.testing.assert_close(fxpeft.merge(gm)(x), out, rtol=1e-5, atol=1e-5)
