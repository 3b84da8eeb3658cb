"""Site discovery: keyword-argument calls are sites, and weights no site reaches are reported with a reason."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fxpeft


class Unreachable(torch.nn.Module):
    """Weights that no linear/conv/embedding call applies: a slice, a view, an einsum, a left matmul, an add."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.in_proj = torch.nn.Parameter(torch.randn(24, 8))   # cross-attention style: sliced
        self.pos = torch.nn.Embedding(16, 8)                    # positional table read by an add
        self.mix = torch.nn.Linear(8, 8)                        # weight used in an einsum
        self.dt = torch.nn.Linear(8, 8)                         # weight on the left of a matmul (Mamba slow path)
        self.flat = torch.nn.Parameter(torch.randn(64))         # viewed into a matrix

    def forward(self, x):
        h = self.lin(x)
        h = F.linear(h, self.in_proj[:8])
        h = h + self.pos.weight[: x.shape[1]]
        h = torch.einsum("bti,oi->bto", h, self.mix.weight)
        h = F.linear(h, self.flat.view(8, 8))
        return (self.dt.weight @ h.transpose(1, 2)).sum()


@pytest.mark.parametrize("with_inputs", [True, False], ids=["export", "fx"])
def test_unreached_weights_are_listed_with_why(with_inputs):
    m = Unreachable()
    gm = fxpeft.trace(m, (torch.randn(2, 5, 8),)) if with_inputs else fxpeft.trace(m)
    sites, unreached = fxpeft.list_sites(gm, with_unreached=True)
    assert [s.name for s in sites] == ["lin"]
    assert set(unreached) == {"in_proj", "pos.weight", "mix.weight", "flat", "dt.weight"}
    assert "slice" in unreached["in_proj"] or "getitem" in unreached["in_proj"]
    assert "einsum" in unreached["mix.weight"]
    assert "matmul" in unreached["dt.weight"]
    assert "view" in unreached["flat"]


def test_rewrite_says_which_targeted_modules_it_cannot_reach():
    gm = fxpeft.trace(Unreachable(), (torch.randn(2, 5, 8),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=r"lin|pos|mix|dt"))
    text = " ".join(str(w.message) for w in caught)
    for name in ("pos.weight", "mix.weight", "dt.weight"):
        assert name in text
    assert [m.site_name for m in fxpeft.adapters(gm).values()] == ["lin"]
    with pytest.raises(fxpeft.TargetError, match="mix.weight is read by einsum"):
        fxpeft.rewrite(fxpeft.trace(Unreachable(), (torch.randn(2, 5, 8),)), fxpeft.LoraConfig(target_modules=["mix"]))


class Keywords(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 4))
        self.k = torch.nn.Parameter(torch.randn(5, 3, 3, 3))
        self.fc = torch.nn.Linear(5, 2)

    def forward(self, x, img):
        h = F.linear(input=x, weight=self.w)
        c = F.conv2d(input=img, weight=self.k, padding=1).mean((2, 3))
        return self.fc(input=c) + h.sum(-1, keepdim=True)


def test_keyword_argument_sites_are_adapted_exactly():
    m = Keywords()
    x, img = torch.randn(3, 4), torch.randn(3, 3, 6, 6)
    ref = m(x, img)
    gm = fxpeft.trace(m)
    assert {s.name for s in fxpeft.list_sites(gm)} == {"w", "k", "fc"}
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["w", "k", "fc"]))
    assert torch.equal(gm(x, img), ref)  # zero-initialised B: exactly the original outputs
    for ad in fxpeft.adapters(gm).values():
        torch.nn.init.normal_(ad.B)
    out = gm(x, img).detach()
    assert (out - ref).abs().max() > 1e-3
    merged = fxpeft.merge(gm)
    assert torch.allclose(merged(x, img), out, rtol=1e-5, atol=1e-5)
