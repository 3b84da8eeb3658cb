"""Bad input: each is a clear, typed error, and the graph is left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, snapshot

import fxpeft
from fxpeft import zoo


@pytest.fixture(scope="module")
def llama():
    model, _, kwargs = zoo.tiny_llama(layers=1)
    return model, kwargs


def _fresh(llama):
    model, kwargs = llama
    return fxpeft.trace(model, kwargs=kwargs)


def test_target_matching_nothing_names_it_and_lists_candidates(llama):
    gm = _fresh(llama)
    snap = snapshot(gm)
    with pytest.raises(fxpeft.TargetError, match=r"'q_prj'.*Did you mean.*q_proj"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(target_modules=["q_proj", "q_prj"]))
    assert_unchanged(gm, snap)
    with pytest.raises(fxpeft.TargetError, match="matches no targetable site"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(target_modules=r"nothing\..*"))
    assert_unchanged(gm, snap)


def test_target_naming_a_non_site_module_says_so(llama):
    gm = _fresh(llama)
    with pytest.raises(fxpeft.TargetError, match="input_layernorm.*applies no linear/conv/embedding"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(target_modules=["input_layernorm"]))


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=-2), dict(r=2.5), dict(rank_pattern={"q_proj": 0}),
                                 dict(lora_dropout=1.0), dict(init_lora_weights="pisa"), dict(use_dora=1),
                                 dict(bias="some"), dict(lora_bias=1), dict(lora_alpha=float("nan")),
                                 dict(lora_alpha=float("inf")),
                                 dict(alpha_pattern={"q_proj": float("nan")})],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_bad_lora_config(llama, bad):
    gm = _fresh(llama)
    snap = snapshot(gm)
    with pytest.raises(fxpeft.ConfigError, match="|".join(bad)):  # the message names the field
        fxpeft.rewrite(gm, fxpeft.LoraConfig(target_modules=["q_proj"], **bad))
    assert_unchanged(gm, snap)
    assert not fxpeft.adapters(gm)


def test_unsupported_site_kind(llama):
    gm = _fresh(llama)
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="embed_tokens.*IA3"):
        fxpeft.rewrite(gm, fxpeft.IA3Config(target_modules=["q_proj", "embed_tokens"]))
    assert_unchanged(gm, snap)
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2), torch.nn.Conv2d(8, 8, 1))
    g2 = fxpeft.trace(grouped, (torch.randn(1, 4, 8, 8),))
    snap = snapshot(g2)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="grouped convolution"):
        fxpeft.rewrite(g2, fxpeft.LoraConfig(r=2, target_modules=["0", "1"]))
    assert_unchanged(g2, snap)


def test_double_rewrite_and_method_mixing(llama):
    gm = _fresh(llama)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    snap = snapshot(gm)
    with pytest.raises(fxpeft.AdapterExistsError, match="already holds adapter 'default'"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["v_proj", "q_proj"]))
    assert_unchanged(gm, snap)
    with pytest.raises(fxpeft.AdapterExistsError, match="mixing lora and ia3"):
        fxpeft.rewrite(gm, fxpeft.IA3Config(target_modules=["q_proj"]), adapter_name="other")
    assert_unchanged(gm, snap)
    for bad_name in ("a/b", "a b", "", ".hidden"):
        with pytest.raises(fxpeft.ConfigError, match="not a valid adapter name"):
            fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["v_proj"]), adapter_name=bad_name)
        assert_unchanged(gm, snap)


def test_adapter_names_with_dash_and_dot(llama):
    # PEFT accepts them ("svd-rank6", "v1.2"): they key adapters, and do not clash with module paths
    gm = _fresh(llama)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="svd-rank6")
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="v1.2")
    assert sorted(a.adapter_name for a in fxpeft.adapters(gm).values()) == ["svd-rank6", "v1.2"]
    fxpeft.set_adapter(gm, "v1.2")
    assert fxpeft.active_adapters(gm) == ["v1.2"]
    fxpeft.passes.MergeAdapters(("v1.2",))(gm)
    assert [a.adapter_name for a in fxpeft.adapters(gm).values()] == ["svd-rank6"]


def test_nan_adapter_at_merge_changes_nothing(llama):
    gm = _fresh(llama)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    bad = next(a for a in fxpeft.adapters(gm).values() if a.site_name.endswith("v_proj"))
    with torch.no_grad():
        bad.B[0, 0] = float("nan")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.MergeError, match="v_proj.*non-finite"):
        fxpeft.merge(gm)
    assert_unchanged(gm, snap)  # q_proj (checked first, and fine) was not merged either
    assert len(fxpeft.adapters(gm)) == 2


def test_untraceable_model_both_routes():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # Python control flow on tensor data
                return self.lin(x)
            return -self.lin(x)

    with pytest.raises(fxpeft.TraceError, match="(?s)symbolic_trace.*example inputs"):
        fxpeft.trace(DataDependent())
    with pytest.raises(fxpeft.TraceError, match=r"(?s)torch.export could not capture DataDependent.*Try:"):
        fxpeft.trace(DataDependent(), (torch.randn(2, 4),), strict=True)
    with pytest.raises(fxpeft.TraceError, match="takes an nn.Module"):
        fxpeft.trace(lambda x: x)


def test_unknown_config_type(llama):
    gm = _fresh(llama)
    with pytest.raises(fxpeft.ConfigError, match="not a registered method config"):
        fxpeft.rewrite(gm, {"r": 8})


def test_missing_target_modules_without_default():
    gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(fxpeft.TargetError, match="target_modules is not set"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2))


def test_symbolic_trace_leaf_and_padding_mode_are_explained():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")

        def forward(self, x, y):
            return self.enc(x), self.conv(y)

    gm = fxpeft.trace(M())
    snap = snapshot(gm)
    with pytest.raises(fxpeft.TargetError, match="'enc.linear1' sits inside 'enc'.*example inputs"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(target_modules=["linear1"]))
    with pytest.raises(fxpeft.TargetError, match="padding_mode='reflect'"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(target_modules=["conv"]))
    assert_unchanged(gm, snap)


def test_merge_unknown_adapter_name_lists_the_names_present(llama):
    gm = _fresh(llama)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), adapter_name="other")
    snap = snapshot(gm)
    for names in (["nme"], ["default", "nme"], "nme"):
        with pytest.raises(fxpeft.ConfigError, match=r"no adapter named 'nme'.*\['default', 'other'\]"):
            fxpeft.merge(gm, names)
        assert_unchanged(gm, snap)  # not even the known name was merged
        assert len(fxpeft.adapters(gm)) == 2


def test_all_linear_with_no_linear_site_raises(llama):
    convs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    for gm in (fxpeft.trace(convs), fxpeft.trace(convs, (torch.randn(2, 3, 8, 8),))):
        snap = snapshot(gm)
        with pytest.raises(fxpeft.TargetError, match="all-linear.*no linear site"):
            fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules="all-linear"))
        assert_unchanged(gm, snap)
        with pytest.raises(fxpeft.TargetError, match="matches no targetable site"):
            fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=r"fc\d"))
        assert_unchanged(gm, snap)
