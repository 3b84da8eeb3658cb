"""VeRA against PEFT 0.21: files both ways with the same outputs (Llama, GPT-2's Conv1D, matrices saved or regenerated
from the key, a bf16 base), the shared projection computed once for sibling sites, fold/unfold, training, dropout,
the lifecycle, and typed refusals that leave the graph unchanged."""

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
from safetensors.torch import load_file, save_file
from torch import nn

import fxpeft
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.vera import vera_projections
from fxpeft.registry import Method, PeftRegistry
from fxpeft.tags import Role, get_tag

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),  # deepcopy of an export graph
              pytest.mark.filterwarnings("ignore:Specified to not (save|load) vera_A")]

_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _downs(gm) -> int:
    """How many ``x @ A.T`` matmuls the graph runs."""
    return sum(1 for n in gm.graph.nodes if (t := get_tag(n)) is not None and t.role is Role.DOWN)


def _shared(gm, name: str = "default"):
    return getattr(gm, Method.shared_path("vera", name))


CASES = {
    "llama-7-projections": ("llama", dict(r=16, target_modules=_PROJ)),
    "llama-regenerated-key-dropout-layers": ("llama", dict(  # no matrices in the file: PEFT's key regenerates them
        r=8, target_modules=["q_proj", "v_proj", "up_proj"], save_projection=False, projection_prng_key=7,
        vera_dropout=0.1, layers_to_transform=[1])),
    "gpt2-conv1d": ("gpt2", dict(r=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_fxpeft_vera_files_are_interchangeable(case, tmp_path):
    base, fields = CASES[case]
    model = _base(base)[0]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(init_weights=False, **fields)).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = _run_model(pm, base)
    assert rel_err(ref, _run_model(model, base)) > 1e-3  # the adapter really changes the outputs

    gm = fxpeft.load_adapter(_graph(base), tmp_path / "peft")  # PEFT -> fxpeft
    got = _run(gm.eval(), base)
    assert rel_err(got, ref) <= 1e-5
    peft_A = next(b for n, b in pm.named_buffers() if n.endswith("vera_A.default"))
    assert torch.equal(_shared(gm).vera_A, peft_A)  # saved or regenerated: PEFT's matrices to the bit

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    assert rel_err(_run_model(pm2, base), got) <= 1e-5
    ours, theirs = load_file(tmp_path / "fx" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert ("base_model.vera_A" in ours) == fields.get("save_projection", True)
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "VERA"
    for k in ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out"):
        assert config[k] == fields.get(k, getattr(peft.VeraConfig(), k)), k

    again = fxpeft.load_adapter(_graph(base), tmp_path / "fx")  # fxpeft -> fxpeft: bit-exact
    assert torch.equal(_run(again.eval(), base), got)
    assert fxpeft.get_nb_trainable_parameters(again) == pm.get_nb_trainable_parameters()


def test_zero_init_is_exact_and_a_peft_config_object_works():
    model = _base("llama")[0]
    cfg = peft.VeraConfig(r=32, target_modules=["q_proj", "k_proj", "down_proj"])  # PEFT's init: λb = 0
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    assert torch.equal(_run(gm, "llama"), _run(_graph("llama"), "llama"))
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, cfg)
    ad = next(iter(fxpeft.adapters(gm).values()))
    assert torch.all(ad.lambda_b == 0) and torch.all(ad.lambda_d == torch.tensor(0.1))
    A, B = vera_projections(32, 128, 64, key=0)  # the largest in (down_proj's 128) and out (q/down's 64)
    assert torch.equal(_shared(gm).vera_A, A) and torch.equal(_shared(gm).vera_B, B)
    assert not any(p.requires_grad for p in _shared(gm).buffers())


def test_siblings_share_one_projection_and_fusion_is_a_view():
    cfg = fxpeft.VeraConfig(r=16, target_modules=_PROJ, init_weights=False)
    torch.manual_seed(0)
    fused = fxpeft.rewrite(_graph("llama"), cfg)
    unfused = fxpeft.rewrite(_graph("llama"), cfg, fuse=False)
    unfused.load_state_dict(fused.state_dict())
    assert _downs(unfused) == 14 and _downs(fused) == 8  # per layer: q/k/v, o, gate/up, down
    assert "cat" not in "".join(str(n.target) for n in fused.graph.nodes if get_tag(n))  # one A: no cat, no split
    ids = _base("llama")[2]["input_ids"]
    outs, grads = [], []
    for gm in (unfused, fused):
        out = gm(input_ids=ids).logits
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in gm.named_parameters() if p.requires_grad})
    assert rel_err(outs[1], outs[0]) <= 1e-6 and len(grads[0]) == 28
    assert all(rel_err(grads[1][n], grads[0][n]) <= 1e-5 for n in grads[0])
    assert fxpeft.passes.UnfuseLowRankSiblings()(fused).modified and _downs(fused) == 14
    assert torch.equal(_run(fused, "llama"), _run(unfused, "llama"))
    assert fxpeft.passes.FuseLowRankSiblings()(fused).modified and _downs(fused) == 8
    assert not fxpeft.passes.FuseLowRankSiblings()(fused).modified
    assert torch.equal(_run(fused, "llama"), _run(unfused, "llama"))


def test_fold_unfold_and_merge_match():
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.VeraConfig(r=16, target_modules=_PROJ, init_weights=False)).eval()
    vera = PeftRegistry.get("vera")
    sites = fxpeft.find_sites(gm)
    for ad in fxpeft.adapters(gm).values():
        site = sites[ad.site_name]
        w = gm.get_parameter(site.weight).detach().float()
        folded, _ = vera.fold(ad, site, w, None)
        assert not torch.equal(folded, w)
        assert rel_err(vera.unfold(ad, site, folded, None)[0], w) <= 1e-6
    want = _run(gm, "llama")
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm, "llama"), want) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    assert rel_err(_run(gm, "llama"), want) <= 1e-5
    assert rel_err(_run(fxpeft.merge(gm), "llama"), want) <= 1e-5


def test_conv1d_merge_matches_peft():
    model = _base("gpt2")[0]
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=8, target_modules=["c_attn", "c_proj"],
                                                                     init_weights=False, fan_in_fan_out=True))
    gm = fxpeft.rewrite(_graph("gpt2"), fxpeft.VeraConfig(r=8, target_modules=["c_attn", "c_proj"]))
    with torch.no_grad():
        for ad in fxpeft.adapters(gm).values():  # PEFT's vectors into fxpeft's adapters
            layer = pm.base_model.model.get_submodule(ad.site_name)
            ad.lambda_b.copy_(layer.vera_lambda_b["default"]), ad.lambda_d.copy_(layer.vera_lambda_d["default"])
    merged = _run_model(pm.merge_and_unload(), "gpt2")
    assert rel_err(_run(fxpeft.merge(gm), "gpt2"), merged) <= 1e-5


def test_a_few_steps_lower_the_loss_and_the_matrices_stay_frozen():
    torch.manual_seed(0)
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.VeraConfig(r=32, target_modules=_PROJ, vera_dropout=0.1,
                                                           d_initial=0.5))
    A = _shared(gm).vera_A.clone()
    losses = lm_train_losses(gm, "llama", steps=4, lr=3e-2)
    assert losses[-1] < losses[0], losses
    assert torch.equal(_shared(gm).vera_A, A)
    trained = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("lambda_b", "lambda_d")) for n in trained)


def test_dropout_is_training_only():
    fields = dict(r=16, target_modules=["q_proj", "v_proj"], init_weights=False)
    torch.manual_seed(0)
    plain = fxpeft.rewrite(_graph("llama"), fxpeft.VeraConfig(**fields))
    dropped = fxpeft.rewrite(_graph("llama"), fxpeft.VeraConfig(vera_dropout=0.5, **fields))
    dropped.load_state_dict(plain.state_dict())
    assert torch.equal(_run(dropped.eval(), "llama"), _run(plain.eval(), "llama"))
    dropped.train()
    assert not torch.equal(_run(dropped, "llama"), _run(dropped, "llama"))


def test_lifecycle_switch_two_adapters_merge_delete(tmp_path):
    base = _run(_graph("llama"), "llama")
    base_code = _base("llama")[3].code
    gm = _graph("llama")
    fxpeft.rewrite(gm, fxpeft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False), "a")
    fxpeft.rewrite(gm, fxpeft.VeraConfig(r=16, target_modules=["q_proj"], init_weights=False,
                                         projection_prng_key=3), "b")
    assert _shared(gm, "a").vera_A.shape == (8, 64) and _shared(gm, "b").vera_A.shape == (16, 64)
    ya = _run(gm, "llama")
    fxpeft.set_adapter(gm, "b")
    yb = _run(gm, "llama")
    with fxpeft.disable_adapters(gm):
        assert torch.equal(_run(gm, "llama"), base)
    fxpeft.set_adapter(gm, ["a", "b"])
    yab = _run(gm, "llama")
    assert rel_err(yab, ya) > 1e-4 and rel_err(yab, yb) > 1e-4
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm, "llama"), yab) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    fxpeft.save_adapter(gm, tmp_path, adapter_name="b")
    fxpeft.delete_adapter(gm, "a")
    assert not hasattr(gm, Method.shared_path("vera", "a"))
    fxpeft.set_adapter(gm, "b")
    assert rel_err(_run(gm, "llama"), yb) <= 1e-6
    assert rel_err(_run(fxpeft.load_adapter(_graph("llama"), tmp_path), "llama"), yb) <= 1e-6
    fxpeft.delete_adapter(gm, "b")
    assert gm.code == base_code


def test_bf16_base_keeps_fp32_vectors_and_peft_rounded_matrices(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=8, target_modules=["0", "2"],
                                                                     init_weights=False, save_projection=False))
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(model, (x,)), tmp_path)
    assert all(p.dtype == torch.float32 for n, p in gm.named_parameters() if "vera_" in n)
    peft_A = next(b for n, b in pm.named_buffers() if n.endswith("vera_A.default"))
    assert peft_A.dtype == torch.float32 and torch.equal(_shared(gm).vera_A, peft_A)  # rounded through bf16
    with torch.no_grad():
        got, ref = gm(x), pm(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) <= 1e-2 and rel_err(ref, model(x)) > 1e-2


def test_refusals_are_typed_and_leave_the_graph_unchanged(tmp_path):
    gm = _graph("llama")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="embedding"):
        fxpeft.rewrite(gm, fxpeft.VeraConfig(target_modules=["embed_tokens", "q_proj"]))
    bad = [dict(r=0), dict(r=2.5), dict(projection_prng_key=-1), dict(projection_prng_key=True),
           dict(save_projection="yes"), dict(vera_dropout=1.0), dict(d_initial=float("nan")),
           dict(init_weights="gaussian"), dict(bias="lora_only")]
    for fields in bad:
        with pytest.raises(fxpeft.ConfigError):
            fxpeft.rewrite(gm, fxpeft.VeraConfig(target_modules=["q_proj"], **fields))
    assert_unchanged(gm, snap)
    cnn = _graph("cnn")
    with pytest.raises(fxpeft.UnsupportedSiteError, match="convolution"):
        fxpeft.rewrite(cnn, fxpeft.VeraConfig(target_modules=["conv1", "fc"]))
    with pytest.raises(fxpeft.UnsupportedSiteError, match="mixed-batch"):
        fxpeft.mixed_batch(fxpeft.rewrite(_graph("llama"), fxpeft.VeraConfig(r=4, target_modules=["q_proj"])))
    # a file that says it carries the matrices but does not: refused, nothing changed
    src = fxpeft.rewrite(_graph("llama"), fxpeft.VeraConfig(r=4, target_modules=["q_proj"], init_weights=False))
    fxpeft.save_adapter(src, tmp_path / "full")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_NAME).write_text((tmp_path / "full" / CONFIG_NAME).read_text())
    tensors = load_file(tmp_path / "full" / WEIGHTS_NAME)
    save_file({k: v for k, v in tensors.items() if "vera_A" not in k}, tmp_path / "bad" / WEIGHTS_NAME)
    with pytest.raises(fxpeft.AdapterFileError, match="vera_A"):
        fxpeft.load_adapter(gm, tmp_path / "bad")
    assert_unchanged(gm, snap)
    other = snapshot(src)
    fxpeft.save_adapter(fxpeft.rewrite(_graph("llama"), fxpeft.VeraConfig(r=8, target_modules=["q_proj"])),
                        tmp_path / "r8")
    with pytest.raises(fxpeft.AdapterFileError, match="r=8"):  # a hot-swap keeps shapes
        fxpeft.hotswap_adapter(src, tmp_path / "r8")
    assert_unchanged(src, other)


def test_hot_swap_replaces_vectors_and_matrices_in_place(tmp_path):
    fields = dict(r=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    torch.manual_seed(3)
    other = fxpeft.rewrite(_graph("llama"), fxpeft.VeraConfig(projection_prng_key=5, **fields))
    fxpeft.save_adapter(other, tmp_path)
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.VeraConfig(**fields))
    code = gm.code
    fxpeft.hotswap_adapter(gm, tmp_path)  # the file's matrices (key 5) replace the adapter's (key 0)
    assert gm.code == code and torch.equal(_run(gm, "llama"), _run(other, "llama"))
    assert torch.equal(_shared(gm).vera_A, _shared(other).vera_A)
    keyless = fxpeft.rewrite(_graph("llama"), fxpeft.VeraConfig(save_projection=False, projection_prng_key=5, **fields))
    fxpeft.save_adapter(keyless, tmp_path / "keyless")
    quiet = fxpeft.rewrite(_graph("llama"), fxpeft.VeraConfig(save_projection=False, **fields))
    with pytest.raises(fxpeft.AdapterFileError, match="projection_prng_key=5"):  # its matrices come from key 0
        fxpeft.hotswap_adapter(quiet, tmp_path / "keyless")
