"""Property-based tests over generated MLP and CNN stacks (hypothesis)."""

from __future__ import annotations

import torch
from conftest import assert_unchanged, rel_err, snapshot
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fxpeft

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mlps(draw):
    widths = draw(st.lists(st.integers(1, 24), min_size=2, max_size=5))
    bias = draw(st.booleans())
    layers = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < len(widths) - 2:
            layers.append(draw(st.sampled_from([torch.nn.ReLU(), torch.nn.Tanh(), torch.nn.GELU()])))
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    model = torch.nn.Sequential(*layers).eval()
    x = torch.randn(draw(st.integers(1, 5)), widths[0])
    return model, x


@st.composite
def cnns(draw):
    chans = draw(st.lists(st.integers(1, 8), min_size=2, max_size=4))
    layers = []
    for i in range(len(chans) - 1):
        k = draw(st.sampled_from([1, 3]))
        layers.append(torch.nn.Conv2d(chans[i], chans[i + 1], k, stride=draw(st.sampled_from([1, 2])),
                                      padding=draw(st.integers(0, 1)), dilation=draw(st.sampled_from([1, 2]))))
        layers.append(torch.nn.ReLU())
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    model = torch.nn.Sequential(*layers).eval()
    x = torch.randn(draw(st.integers(1, 3)), chans[0], 12, 12)
    try:  # strides and dilations can shrink the image below a kernel: not a model at all
        model(x)
    except RuntimeError:
        assume(False)
    return model, x


def _lora(draw_r, draw_alpha, names, init=True, rslora=False):
    return fxpeft.LoraConfig(r=draw_r, lora_alpha=draw_alpha, target_modules=names, init_lora_weights=init,
                             use_rslora=rslora)


def _sites(gm):
    return [s.name for s in fxpeft.list_sites(gm)]


@SETTINGS
@given(case=st.one_of(mlps(), cnns()), r=st.integers(1, 6), alpha=st.sampled_from([1, 4, 16]),
       symbolic=st.booleans(), rslora=st.booleans())
def test_identity_at_init(case, r, alpha, symbolic, rslora):
    model, x = case
    gm = fxpeft.trace(model) if symbolic else fxpeft.trace(model, (x,))
    fxpeft.rewrite(gm, _lora(r, alpha, _sites(gm), rslora=rslora))
    gm.graph.lint()
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


@SETTINGS
@given(case=st.one_of(mlps(), cnns()), r=st.integers(1, 6), alpha=st.sampled_from([1, 4, 16]),
       symbolic=st.booleans(), method=st.sampled_from(["lora", "ia3"]))
def test_merge_equivalence(case, r, alpha, symbolic, method):
    model, x = case
    gm = fxpeft.trace(model) if symbolic else fxpeft.trace(model, (x,))
    names = _sites(gm)
    cfg = _lora(r, alpha, names, init=False) if method == "lora" else fxpeft.IA3Config(
        target_modules=names, feedforward_modules=names[-1:], init_ia3_weights=False)
    fxpeft.rewrite(gm, cfg)
    with torch.no_grad():
        unmerged = gm(x)
    fxpeft.merge(gm)
    gm.graph.lint()
    assert not fxpeft.adapters(gm)
    with torch.no_grad():
        merged = gm(x)
    if unmerged.norm() > 1e-6:
        assert rel_err(merged, unmerged) <= 1e-5
    else:
        assert (merged - unmerged).abs().max() <= 1e-6


@SETTINGS
@given(case=st.one_of(mlps(), cnns()), symbolic=st.booleans(),
       bad=st.sampled_from(["no-such-layer", "r0", "twice", "ia3-ff-not-target"]))
def test_failed_rewrite_leaves_graph_unchanged(case, symbolic, bad):
    model, x = case
    gm = fxpeft.trace(model) if symbolic else fxpeft.trace(model, (x,))
    names = _sites(gm)
    if bad == "twice":
        fxpeft.rewrite(gm, _lora(2, 2, names[:1]))
    snap = snapshot(gm)
    cfg = {
        "no-such-layer": _lora(2, 2, names + ["no_such_layer"]),
        "r0": _lora(0, 2, names),
        "twice": _lora(2, 2, names),
        "ia3-ff-not-target": fxpeft.IA3Config(target_modules=names[:1], feedforward_modules=["elsewhere"]),
    }[bad]
    try:
        fxpeft.rewrite(gm, cfg)
    except fxpeft.FxPeftError:
        pass
    else:
        raise AssertionError(f"{bad}: rewrite should have failed")
    assert_unchanged(gm, snap)
