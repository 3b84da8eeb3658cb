"""add_weighted_adapter, checked against PEFT's LoraModel.add_weighted_adapter on a tiny HF Llama (linear and
embedding sites) and a CNN (conv sites), plus the places where fxpeft is deliberately right where PEFT 0.21 is not."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import assert_unchanged, out_tensor, rel_err, snapshot

import fxpeft
import fxpeft.combine
from fxpeft import zoo
from fxpeft.combine import prune_at_random, prune_by_magnitude

peft = pytest.importorskip("peft")

# name -> LoRA settings shared by fxpeft and PEFT (names that are no substring of PEFT's "lora_" prefix). x and y
# share a rank (linear, ties, magnitude_prune need it); z has another (svd, cat and the *_svd types take any).
# Sites overlap partly; all three adapt the embedding.
LLAMA = {"x": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
         "y": dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "embed_tokens"]),
         "z": dict(r=6, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"])}
# conv1 is a 3x3 conv, conv3 a 1x1 conv (conv2 is dilated: PEFT's conv LoRA ignores dilation, so it is left out).
CNN = {"x": dict(r=2, lora_alpha=4, target_modules=["conv1", "conv3", "fc"]),
       "y": dict(r=2, lora_alpha=2, target_modules=["conv1", "fc"]),
       "z": dict(r=3, lora_alpha=4, target_modules=["conv1", "conv3"])}


def _randomize(gm: torch.fx.GraphModule, seed: int) -> None:
    """Non-zero, moderate factors everywhere (LoRA's non-zero embedding init, N(0, 1), would drown the rest)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in fxpeft.adapters(gm).values():
            m.A.copy_(torch.randn(m.A.shape, generator=g) * 0.3)
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.3)


def _to_peft(pm, gm: torch.fx.GraphModule) -> None:
    """Copy every fxpeft adapter's factors into the PEFT model's adapter of the same name and site."""
    with torch.no_grad():
        for m in fxpeft.adapters(gm).values():
            if m.adapter_name not in pm.peft_config:
                continue
            layer = pm.base_model.model.get_submodule(m.site_name)
            if m.adapter_name in layer.lora_embedding_A:
                layer.lora_embedding_A[m.adapter_name].copy_(m.A)
                layer.lora_embedding_B[m.adapter_name].copy_(m.B)
            else:
                layer.lora_A[m.adapter_name].weight.copy_(m.A)
                layer.lora_B[m.adapter_name].weight.copy_(m.B)


def _build(model, args, kwargs, adapters: dict[str, dict], seed: int = 0):
    """The same adapters (same factors) on fxpeft's graph and on a PEFT model of a copy of ``model``."""
    gm = fxpeft.trace(copy.deepcopy(model), args, kwargs)
    for name, cfg in adapters.items():
        fxpeft.rewrite(gm, fxpeft.LoraConfig(**cfg, init_lora_weights=False), name)
    _randomize(gm, seed)
    names = list(adapters)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, peft.LoraConfig(**adapters[name]))
    _to_peft(pm, gm)
    return gm, pm


@pytest.fixture(scope="module")
def llama():
    model, args, kwargs = zoo.tiny_llama(layers=2, vocab=128)
    gm, pm = _build(model, args, kwargs, LLAMA)
    return model, gm, pm, args, kwargs


@pytest.fixture(scope="module")
def cnn():
    model, args, kwargs = zoo.cnn()
    gm, pm = _build(model, args, kwargs, CNN)
    return model, gm, pm, args, kwargs


def _out(m, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return out_tensor(m(*args, **kwargs)).detach()


def _both(setup, new: str, adapters: list[str], weights: list[float], **kw):
    """add_weighted_adapter in fxpeft and in PEFT with the same arguments; switch both to it; return their outputs."""
    _, gm, pm, args, kwargs = setup
    active = fxpeft.active_adapters(gm)
    fxpeft.add_weighted_adapter(gm, adapters, weights, new, **kw)
    gm.graph.lint()
    assert fxpeft.active_adapters(gm) == active  # added, not made active (as PEFT)
    assert new in fxpeft.adapter_names(gm) and f"lora_{new}" in gm.code  # a first-class adapter, in the code
    assert not any(p.requires_grad for n, p in gm.named_parameters() if f"lora_{new}." in n)  # frozen, as PEFT
    pm.add_weighted_adapter(adapters, weights, new, **kw)
    assert {m.r for m in fxpeft.adapters(gm).values() if m.adapter_name == new} == {pm.peft_config[new].r}
    fxpeft.set_adapter(gm, new)
    pm.base_model.set_adapter(new)
    return _out(gm, args, kwargs), _out(pm, args, kwargs)


CASES = [  # (combination_type, adapters, weights, options)
    ("svd", ["x", "z"], [0.7, -0.4], {}),
    ("svd", ["x", "y", "z"], [0.5, 0.3, 0.6], {"svd_rank": 3, "svd_clamp": 0.95, "svd_full_matrices": False}),
    ("cat", ["x", "y", "z"], [0.5, 0.3, -0.6], {}),
    ("linear", ["x", "y"], [0.7, -0.4], {}),
    ("ties", ["x", "y"], [0.7, 0.4], {"density": 0.5}),
    ("ties", ["x", "y"], [0.7, -0.4], {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", ["x", "z"], [0.7, 0.4], {"density": 0.6}),
    ("magnitude_prune", ["x", "y"], [0.7, -0.4], {"density": 0.5}),
    ("magnitude_prune_svd", ["x", "y", "z"], [0.7, 0.4, 0.5], {"density": 0.4, "svd_rank": 5}),
]


@pytest.mark.parametrize("kind,adapters,weights,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_llama_matches_peft(llama, kind, adapters, weights, kw):
    ours, ref = _both(llama, f"m{CASES.index((kind, adapters, weights, kw))}", adapters, weights,
                      combination_type=kind, **kw)
    assert rel_err(ours, ref) <= 1e-4
    assert rel_err(ours, _out(llama[0], llama[3], llama[4])) > 1e-3  # the combination does change the outputs


def _value_mask(t: torch.Tensor, density: float, rescale: bool = True) -> torch.Tensor:
    """A stand-in for DARE's random mask that both sides draw alike: it keeps an entry by its value, so it does
    not depend on the order of draws (PEFT's new adapter's own initialisation draws first) nor on the layout."""
    keep = ((t.abs() * 1e4).floor() % 7) < density * 7
    return t * keep / density if rescale else t * keep


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_llama_dare_matches_peft_given_the_same_masks(llama, kind, monkeypatch):
    # Everything but the random draw is PEFT's: which tensors are pruned, the rescale, the weights, the election.
    monkeypatch.setattr(fxpeft.combine, "prune_at_random", _value_mask)
    monkeypatch.setattr(peft.utils.merge_utils, "random_pruning", _value_mask)
    adapters = ["x", "z"] if kind.endswith("svd") else ["x", "y"]
    ours, ref = _both(llama, f"m_{kind}", adapters, [0.6, -0.5], combination_type=kind, density=0.6)
    assert rel_err(ours, ref) <= 1e-4


CNN_CASES = [("svd", ["x", "z"], {}), ("cat", ["x", "y", "z"], {}), ("linear", ["x", "y"], {}),
             ("ties", ["x", "y"], {"density": 0.5}), ("magnitude_prune_svd", ["x", "z"], {"density": 0.5})]


@pytest.mark.parametrize("kind,adapters,kw", CNN_CASES, ids=[c[0] for c in CNN_CASES])
def test_cnn_matches_peft(cnn, kind, adapters, kw):
    weights = [0.8, -0.5, 0.4][: len(adapters)]
    ours, ref = _both(cnn, f"m_{kind}", adapters, weights, combination_type=kind, **kw)
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("layer,svd_rank", [(torch.nn.Conv1d(4, 6, 3), 4), (torch.nn.Linear(3, 5), 8)],
                         ids=["conv1d", "rank-above-the-delta's"])
def test_svd_is_exact_at_full_rank(layer, svd_rank):
    # PEFT's *_svd types flatten only Conv2d deltas (a Conv1d delta goes to a batched SVD and fails); fxpeft's
    # flatten every conv. With svd_rank >= the sum of the ranks, the truncation drops nothing; an svd_rank above
    # the delta's size (3 here; PEFT's factors then come out with mismatched ranks) is padded with zeros.
    model = torch.nn.Sequential(layer)
    gm = fxpeft.trace(model)
    for name in ("x", "y"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"], init_lora_weights=False), name)
    fxpeft.add_weighted_adapter(gm, ["x", "y"], [0.7, -0.3], "s", svd_rank=svd_rank)
    mods = {m.adapter_name: m for m in fxpeft.adapters(gm).values()}
    site = fxpeft.find_sites(gm)["0"]
    want = 0.7 * mods["x"].delta_weight(site) - 0.3 * mods["y"].delta_weight(site)
    assert mods["s"].r == svd_rank and rel_err(mods["s"].delta_weight(site), want) <= 1e-5


def test_saved_combination_loads_in_peft(llama, tmp_path):
    model, gm, _, args, kwargs = llama
    fxpeft.add_weighted_adapter(gm, ["x", "z"], [0.6, 0.5], "saved", combination_type="cat")
    fxpeft.set_adapter(gm, "saved")
    fxpeft.save_adapter(gm, tmp_path, "saved")
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (10, 10, False)  # PEFT's r = alpha
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert rel_err(_out(loaded, args, kwargs), _out(gm, args, kwargs)) <= 1e-5


# ------------------------------------------------------------------------------------------ DARE statistics


def test_random_pruning_keeps_density_and_expectation():
    torch.manual_seed(0)
    t = torch.randn(64)
    for density in (0.2, 0.7):
        draws = prune_at_random(t.expand(20000, 64).contiguous(), density)  # 20000 independent masks
        kept = draws != 0
        n = kept.numel()
        assert abs(kept.float().mean().item() - density) <= 5 * (density * (1 - density) / n) ** 0.5
        assert torch.allclose(draws[kept], (t / density).expand(20000, 64)[kept])  # kept entries are rescaled
        # the rescale keeps each entry's expectation: mean over draws ~ t within 5 standard errors
        se = t.abs() * ((1 - density) / density / 20000) ** 0.5
        assert ((draws.mean(0) - t).abs() <= 5 * se + 1e-6).all()
    assert torch.equal(prune_at_random(t, 1.0), t)


def test_magnitude_pruning_keeps_the_largest():
    t = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.2])
    assert torch.equal(prune_by_magnitude(t, 0.4), torch.tensor([0.0, -3.0, 0.0, 2.0, 0.0]))


def _mlp_graph(adapters: dict[str, dict], seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    gm = fxpeft.trace(model)
    for name, cfg in adapters.items():
        fxpeft.rewrite(gm, fxpeft.LoraConfig(**cfg, init_lora_weights=False), name)
    return model, gm


def test_dare_keeps_the_density_in_the_factors_and_is_reproducible():
    same = dict(r=16, lora_alpha=16, target_modules=["0", "2"])
    _, gm = _mlp_graph({"a": same, "b": same})
    density = 0.3
    for i, kind in enumerate(("dare_linear", "dare_linear", "dare_ties", "dare_ties")):
        torch.manual_seed(123)  # the same seed twice per type: the same adapter
        fxpeft.add_weighted_adapter(gm, ["a", "b"], [1.0, 0.0], f"{kind}{i}", combination_type=kind, density=density)
    mods = {(m.adapter_name, m.site_name): m for m in fxpeft.adapters(gm).values()}
    for kind, i in (("dare_linear", 0), ("dare_ties", 2)):
        a, b = f"{kind}{i}", f"{kind}{i + 1}"
        for site in ("0", "2"):
            assert torch.equal(mods[a, site].A, mods[b, site].A) and torch.equal(mods[a, site].B, mods[b, site].B)
    # weight 0 on "b": the new factors are a's, pruned with a's own mask and rescaled (scaling 1: alpha = r)
    for site in ("0", "2"):
        src, new = mods["a", site], mods["dare_linear0", site]
        for got, ref in ((new.A, src.A), (new.B, src.B)):
            kept = got != 0
            n = kept.numel()
            assert abs(kept.float().mean().item() - density) <= 5 * (density * (1 - density) / n) ** 0.5
            torch.testing.assert_close(got[kept], ref[kept] / density, rtol=1e-5, atol=1e-6)
    torch.manual_seed(124)
    fxpeft.add_weighted_adapter(gm, ["a", "b"], [1.0, 0.0], "other", combination_type="dare_linear", density=density)
    assert not torch.equal(mods["dare_linear0", "0"].A, fxpeft.adapters(gm)["0.lora_other"].A)


# ------------------------------------------------------------------------------- right where PEFT is wrong


@pytest.mark.parametrize("kind", ["linear", "svd", "cat"])
def test_rslora_first_gives_the_same_as_rslora_second(kind):
    # PEFT 0.21.2 copies use_rslora from the first adapter into the new one (r = alpha = new rank): its scaling
    # becomes sqrt(r) instead of 1 when an rsLoRA adapter comes first. fxpeft's does not depend on the order.
    cfgs = {"rs": dict(r=4, lora_alpha=8, target_modules=["0", "2"], use_rslora=True),
            "plain": dict(r=4, lora_alpha=8, target_modules=["0", "2"])}
    model, gm = _mlp_graph(cfgs)
    x = torch.randn(3, 96)
    fxpeft.add_weighted_adapter(gm, ["rs", "plain"], [0.5, 0.5], "rs_first", combination_type=kind)
    fxpeft.add_weighted_adapter(gm, ["plain", "rs"], [0.5, 0.5], "plain_first", combination_type=kind)
    assert all(not m.use_rslora and m.scaling == 1 for m in fxpeft.adapters(gm).values()
               if m.adapter_name.endswith("_first"))
    outs = {}
    for name in ("rs_first", "plain_first"):
        fxpeft.set_adapter(gm, name)
        outs[name] = gm(x).detach()
    assert rel_err(outs["rs_first"], outs["plain_first"]) <= 1e-5
    # and both are what PEFT gives in the order where it is right (the plain adapter first)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfgs["rs"]), adapter_name="rs")
    pm.add_adapter("plain", peft.LoraConfig(**cfgs["plain"]))
    _to_peft(pm, gm)
    pm.add_weighted_adapter(["plain", "rs"], [0.5, 0.5], "mix", combination_type=kind)
    pm.base_model.set_adapter("mix")
    assert rel_err(outs["rs_first"], pm(x).detach()) <= 1e-4


def test_one_adapter_warns_and_combines_linearly():
    cfg = dict(r=4, lora_alpha=8, target_modules=["0", "2"])
    _, gm = _mlp_graph({"a": cfg})
    with pytest.warns(UserWarning, match="'linear'"):
        # PEFT switches to linear silently (and so needs no density for a pruning type)
        fxpeft.add_weighted_adapter(gm, ["a"], [0.6], "one", combination_type="ties")
    fxpeft.add_weighted_adapter(gm, ["a"], [0.6], "lin", combination_type="linear")
    for site in ("0", "2"):
        one, lin = fxpeft.adapters(gm)[f"{site}.lora_one"], fxpeft.adapters(gm)[f"{site}.lora_lin"]
        assert one.r == 4 and torch.equal(one.A, lin.A) and torch.equal(one.B, lin.B)


@pytest.fixture()
def mlp():
    return _mlp_graph({"a": dict(r=4, lora_alpha=8, target_modules=["0", "2"]),
                       "b": dict(r=4, lora_alpha=4, target_modules=["0"]),
                       "c": dict(r=6, lora_alpha=8, target_modules=["0"])})[1]


BAD = [  # (args, kwargs, message)
    ((["a", "b"], [1.0, 1.0], "a"), {}, r"already holds an adapter named 'a'.*delete_adapter"),
    ((["a", "nope"], [1.0, 1.0], "n"), {}, r"no adapter named 'nope'.*\['a', 'b', 'c'\]"),
    ((["a", "b"], [1.0], "n"), {}, r"2 adapters but 1 weights"),
    ((["a", "b"], [1.0, float("nan")], "n"), {}, r"finite numbers"),
    (("a", [1.0], "n"), {}, r"list of adapter names"),
    ((["a", "b"], [1.0, 1.0], "n"), {"combination_type": "mean"}, r"combination_type='mean'"),
    ((["a", "b"], [1.0, 1.0], "n"), {"combination_type": "ties"}, r"pass density="),
    ((["a", "b"], [1.0, 1.0], "n"), {"combination_type": "dare_linear", "density": 0}, r"density must be"),
    ((["a", "b"], [1.0, 1.0], "n"), {"combination_type": "magnitude_prune", "density": 1.5}, r"density must be"),
    ((["a", "b"], [1.0, 1.0], "n"), {"majority_sign_method": "max"}, r"majority_sign_method"),
    ((["a", "b"], [1.0, 1.0], "n"), {"svd_rank": 0}, r"svd_rank"),
    ((["a", "b"], [1.0, 1.0], "n"), {"svd_clamp": 2}, r"svd_clamp"),
    ((["a", "b"], [1.0, 1.0], "n"), {"svd_driver": "gesvdj"}, r"only on CUDA"),
    ((["a", "b"], [1.0, 1.0], "bad name!"), {}, r"not a valid adapter name"),
    ((["a", "c"], [1.0, 1.0], "n"), {"combination_type": "linear"}, r"site '0' must share a rank.*\[4, 6\]"),
]


@pytest.mark.parametrize("args,kw,match", BAD, ids=[b[2][:24] for b in BAD])
def test_bad_arguments_raise_and_change_nothing(mlp, args, kw, match):
    snap, names = snapshot(mlp), fxpeft.adapter_names(mlp)
    with pytest.raises(fxpeft.ConfigError, match=match):
        fxpeft.add_weighted_adapter(mlp, *args, **kw)
    assert_unchanged(mlp, snap)
    assert fxpeft.adapter_names(mlp) == names


def test_methods_without_weighted_merges_raise_and_change_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    gm = fxpeft.trace(model)
    fxpeft.rewrite(gm, fxpeft.IA3Config(target_modules=["0"], feedforward_modules=[]), "i")
    fxpeft.rewrite(gm, fxpeft.IA3Config(target_modules=["0"], feedforward_modules=[]), "j")
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["2"]), "l")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.ConfigError, match="IA3 does not support weighted merges"):
        fxpeft.add_weighted_adapter(gm, ["i", "j"], [0.5, 0.5], "n")
    with pytest.raises(fxpeft.ConfigError, match="mix methods"):
        fxpeft.add_weighted_adapter(gm, ["i", "l"], [0.5, 0.5], "n")
    assert_unchanged(gm, snap)
