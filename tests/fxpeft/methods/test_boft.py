"""BOFT against PEFT 0.21.2: files both ways with the same outputs (linear and Conv2d sites, one butterfly factor on
PEFT's CPU fallback, several on PEFT's CUDA-path maths), the weight the call reads (``s ⊙ W Rᵀ``), fold/unfold,
training, the training-only block dropout, a symbolic_trace graph, a dilated conv, and typed refusals that leave
the graph unchanged."""

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
from fxpeft.methods.boft import BoftDropout, butterfly_perm
from fxpeft.registry import PeftRegistry

peft = pytest.importorskip("peft")
boft_layer = pytest.importorskip("peft.tuners.boft.layer")
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),  # deepcopy of an export graph
              pytest.mark.filterwarnings("ignore:.*CUDA extension:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*boft_n_butterfly_factor:UserWarning")]


class _BlockDiag:
    """Stands in for PEFT's ``fbd_cuda`` extension (``FastBlockDiag``: ``[N, D, H, H] -> [N, D·H, D·H]``) so that
    PEFT's CUDA path, the only one with several butterfly factors, runs on the CPU."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])]


@pytest.fixture
def peft_butterfly(monkeypatch):
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _BlockDiag())


_PROJ = ["q_proj", "v_proj", "down_proj"]
CASES = {  # name: (base, fields, PEFT's CUDA path)
    "llama-block-size": ("llama", dict(boft_block_size=4, target_modules=_PROJ), False),
    "llama-block-num-dropout": ("llama", dict(boft_block_size=0, boft_block_num=8, boft_dropout=0.2, target_modules=_PROJ), False),
    "llama-3-butterfly-factors": ("llama", dict(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=_PROJ),
                                  True),
    "cnn-conv2d": ("cnn", dict(boft_block_size=3, target_modules=["conv1"]), False),
    "cnn-conv1x1-linear-butterfly": ("cnn", dict(boft_block_size=4, boft_n_butterfly_factor=2,
                                                 target_modules=["conv3", "fc"]), True),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_fxpeft_boft_files_are_interchangeable(case, tmp_path, request):
    base, fields, cuda_path = CASES[case]
    if cuda_path:
        request.getfixturevalue("peft_butterfly")
    model = _base(base)[0]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.BOFTConfig(init_weights=False, **fields)).eval()
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
    factors = fields.get("boft_n_butterfly_factor", 1)
    assert all(v.shape[0] == factors for k, v in ours.items() if k.endswith("boft_R"))
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "BOFT"
    for k in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout"):
        assert config[k] == getattr(pm.peft_config["default"], k), k
    # the trainable-parameter count is PEFT's
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == pm.get_nb_trainable_parameters()[0]


def test_the_call_reads_the_rotated_weight_and_a_peft_config_object_works():
    model = _base("llama")[0]
    cfg = peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "down_proj"])  # PEFT's default: identity
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    assert torch.equal(_run(gm, "llama"), _run(_graph("llama"), "llama"))  # zero-init: exactly the base
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == peft_counts(model, cfg)[0]
    code = gm.code
    assert "q_proj_rotation_blocks = torch.ops.aten.linalg_solve.default(" in code
    assert "q_proj_adapted_weight = torch.ops.aten.where.self(model_layers_0_self_attn_q_proj_gate, " \
           "model_layers_0_self_attn_q_proj_scaled_rotated_weight, model_layers_0_self_attn_q_proj_weight)" in code
    assert re.search(r"linear\.default\(\w+, model_layers_0_self_attn_q_proj_adapted_weight\)", code)  # one matmul
    assert "permute_0" not in code  # one butterfly factor: no permutations


def test_zero_init_and_a_switched_off_adapter_are_exact_in_both_dialects():
    model, args, _ = zoo.cnn()
    want = model(*args)
    cfg = fxpeft.BOFTConfig(boft_block_size=0, boft_block_num=2, boft_n_butterfly_factor=2,
                            target_modules=["conv2", "conv3", "fc"])
    for gm in (fxpeft.trace(model, args), fxpeft.trace(model)):
        assert torch.equal(fxpeft.rewrite(gm, cfg)(*args), want)
        for p in fxpeft.adapters(gm).values():
            nn.init.normal_(p.boft_R, 0, 0.1)
        assert rel_err(gm(*args), want) > 1e-3
        with fxpeft.disable_adapters(gm):
            assert torch.equal(gm(*args), want)


@pytest.mark.filterwarnings("ignore")
def test_symbolic_trace_graph_adds_the_update_to_the_output(tmp_path):
    model = _base("cnn")[0]
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.BOFTConfig(
        boft_block_size=4, target_modules=["conv3", "fc"], init_weights=False)).eval()
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(copy.deepcopy(model)), tmp_path)  # call_module sites: y + op(x, W' - W)
    assert "fc_delta_weight" in gm.code and rel_err(_run(gm.eval(), "cnn"), _run_model(pm, "cnn")) <= 1e-5


def test_dilated_conv_is_a_true_rotation_where_peft_forward_drops_the_dilation(tmp_path):
    model = _base("cnn")[0]  # conv2: 3x3, stride 2, padding 2, dilation 2
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.BOFTConfig(
        boft_block_size=8, target_modules=["conv2"], init_weights=False)).eval()
    pm.save_pretrained(str(tmp_path))
    peft_forward = _run_model(pm, "cnn")
    merged = pm.merge_and_unload()  # PEFT's merge rotates the weight; the merged Conv2d keeps its dilation
    with pytest.warns(UserWarning, match="drops the dilation"):
        gm = fxpeft.load_adapter(_graph("cnn"), tmp_path)
    got = _run(gm.eval(), "cnn")
    assert rel_err(got, _run_model(merged, "cnn")) <= 1e-5
    assert rel_err(peft_forward, got) > 1e-2  # PEFT's own forward is not its merge here


@pytest.mark.parametrize("case", ["llama-3-butterfly-factors", "cnn-conv2d"])
def test_fold_matches_peft_merge_and_unfold_restores_the_weight(case, request):
    base, fields, cuda_path = CASES[case]
    if cuda_path:
        request.getfixturevalue("peft_butterfly")
    model = _base(base)[0]
    torch.manual_seed(4)
    gm = fxpeft.rewrite(_graph(base), fxpeft.BOFTConfig(init_weights=False, **fields)).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.BOFTConfig(init_weights=False, **fields))
    boft, sites = PeftRegistry.get("boft"), fxpeft.find_sites(gm)
    loaded = pm.load_state_dict({f"base_model.model.{ad.site_name}.{k}.default": v
                                 for ad in fxpeft.adapters(gm).values() for k, v in boft.site_tensors(ad, None).items()},
                                strict=False)
    assert not loaded.unexpected_keys
    merged = dict(pm.merge_and_unload().named_parameters())
    for ad in fxpeft.adapters(gm).values():
        site = sites[ad.site_name]
        w = gm.get_parameter(site.weight).detach().float()
        folded, _ = boft.fold(ad, site, w, None)
        assert rel_err(folded, merged[site.weight]) <= 1e-5 and rel_err(folded, w) > 1e-3  # PEFT's merge
        back, _ = boft.unfold(ad, site, folded, None)
        assert rel_err(back, w) <= 1e-6
    want = _run(gm, base)
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm, base), want) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    base_w = dict(_base(base)[3].named_parameters())
    for n, p in gm.named_parameters():
        if n in base_w:
            assert rel_err(p, base_w[n]) <= 1e-5, n
    assert rel_err(_run(fxpeft.merge(gm), base), want) <= 1e-5


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = fxpeft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.1, target_modules=_PROJ)
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    losses = lm_train_losses(gm, "llama", steps=4, lr=1e-2)
    assert losses[-1] < losses[0], losses
    trained = {n for n, p in gm.named_parameters() if p.grad is not None or p.requires_grad}
    assert trained and all(n.endswith(("boft_R", "boft_s")) for n in trained)  # the base stays frozen


def test_block_dropout_is_training_only_and_replaces_blocks_of_one_factor():
    torch.manual_seed(0)
    q = torch.randn(3, 8, 4, 4)
    drop = BoftDropout(0.5)
    assert torch.equal(drop.eval()(q), q)
    out = drop.train()(q)
    same = (out == q).flatten(2).all(-1)  # [N, D]: untouched blocks
    assert (~same).sum() == 4 and (~same).any(1).sum() == 1  # int(p·D) blocks, all in one factor
    assert torch.equal(out[~same], torch.eye(4).expand(4, 4, 4))
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.BOFTConfig(boft_dropout=0.9, target_modules=["q_proj"],
                                                          init_weights=False))
    assert torch.equal(_run(gm.eval(), "llama"), _run(gm.eval(), "llama"))
    outs = [_run(gm.train(), "llama") for _ in range(3)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # training: random blocks


def test_butterfly_permutations_are_peft_s():
    layer = boft_layer.BOFTLayer.__new__(boft_layer.BOFTLayer)
    for n, blocks, half, levels in [(16, 4, 2, 1), (64, 16, 2, 2), (64, 4, 2, 2), (32, 2, 4, 1), (27, 9, 1, 0)]:
        assert butterfly_perm(n, blocks, half, levels) == layer.block_butterfly_perm(n, blocks, half, levels).tolist()


def test_refusals_are_typed_and_leave_the_graph_unchanged():
    gm = _graph("llama")
    snap = snapshot(gm)
    bad = [dict(boft_block_size=4, boft_block_num=4), dict(boft_block_size=0), dict(boft_block_size=-4),
           dict(boft_block_size=4.0), dict(boft_n_butterfly_factor=0), dict(boft_dropout=1.5),
           dict(init_weights="gaussian"), dict(bias="lora_only")]
    for fields in bad:
        with pytest.raises(fxpeft.ConfigError):
            fxpeft.rewrite(gm, fxpeft.BOFTConfig(target_modules=["q_proj"], **fields))
    site_bad = [(dict(boft_block_size=5), "not divisible by boft_block_size=5"),  # 64 = 12·5 + 4
                (dict(boft_block_size=32, boft_n_butterfly_factor=3), "not a multiple of"),
                (dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=4), "boft_block_num=4")]
    for fields, msg in site_bad:
        with pytest.raises(fxpeft.UnsupportedSiteError, match=msg):
            fxpeft.rewrite(gm, fxpeft.BOFTConfig(target_modules=["q_proj"], **fields))
    with pytest.raises(fxpeft.UnsupportedSiteError, match="embeddings"):
        fxpeft.rewrite(gm, fxpeft.BOFTConfig(target_modules=["embed_tokens", "q_proj"]))
    assert_unchanged(gm, snap)
    flm, args, _ = zoo.functional_lm()
    g2 = fxpeft.trace(flm, args)
    with pytest.raises(fxpeft.UnsupportedSiteError, match=r"\[in, out\]"):  # x @ W (HF Conv1D's form)
        fxpeft.rewrite(g2, fxpeft.BOFTConfig(target_modules=["blocks.0.w_out"]))
    gc = _graph("convs")
    snap = snapshot(gc)
    for target, msg in (("c1", "1-d convolution"), ("g2", "groups=2")):
        with pytest.raises(fxpeft.UnsupportedSiteError, match=msg):
            fxpeft.rewrite(gc, fxpeft.BOFTConfig(boft_block_size=2, target_modules=[target]))
    assert_unchanged(gc, snap)
    gk = fxpeft.trace(nn.Sequential(nn.Conv2d(2, 4, (1, 3))), (torch.randn(1, 2, 4, 4),))
    with pytest.raises(fxpeft.UnsupportedSiteError, match="non-square"):
        fxpeft.rewrite(gk, fxpeft.BOFTConfig(boft_block_size=2, target_modules=["0"]))


def test_a_cpu_peft_file_with_butterfly_factors_is_refused(tmp_path):
    model = _base("llama")[0]  # PEFT without its CUDA extension uses one factor, whatever the config says
    pm = peft.get_peft_model(copy.deepcopy(model), peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                                   target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path))
    gm = _graph("llama")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.AdapterFileError, match="boft_R"):
        fxpeft.load_adapter(gm, tmp_path)
    assert_unchanged(gm, snap)


def test_lifecycle_two_rotations_stack_merge_unmerge_and_delete(tmp_path):
    base = _run(_graph("llama"), "llama")
    base_code = _base("llama")[3].code
    gm = _graph("llama")
    torch.manual_seed(5)
    fxpeft.rewrite(gm, fxpeft.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"], init_weights=False),
                   "a")
    # (one butterfly factor each: PEFT keeps one permutation buffer per layer, the last adapter's)
    fxpeft.rewrite(gm, fxpeft.BOFTConfig(boft_block_size=8, target_modules=["q_proj"], init_weights=False), "b")
    fxpeft.set_adapter(gm, "b")
    yb = _run(gm, "llama")
    with fxpeft.disable_adapters(gm):
        assert torch.equal(_run(gm, "llama"), base)
    fxpeft.set_adapter(gm, ["a", "b"])  # two rotations of one weight: s_b ⊙ ((s_a ⊙ W R_aᵀ) R_bᵀ), as PEFT composes
    yab = _run(gm, "llama")
    boft, sites, ads = PeftRegistry.get("boft"), fxpeft.find_sites(gm), fxpeft.adapters(gm).values()
    by = {(ad.adapter_name, ad.site_name): ad for ad in ads}
    ref = copy.deepcopy(_base("llama")[0])
    with torch.no_grad():
        for (name, site_name), ad in by.items():
            if name == "a":
                site = sites[site_name]
                w, _ = boft.fold(ad, site, ref.get_parameter(site.weight), None)
                if ("b", site_name) in by:
                    w, _ = boft.fold(by["b", site_name], site, w, None)
                ref.get_parameter(site.weight).copy_(w)
    assert rel_err(yab, _run_model(ref, "llama")) <= 1e-5 and rel_err(yab, yb) > 1e-3
    for name in ("a", "b"):
        fxpeft.save_adapter(gm, tmp_path / name, adapter_name=name)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(_base("llama")[0]), str(tmp_path / "a"), adapter_name="a")
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    assert rel_err(_run_model(pm, "llama"), yab) <= 1e-5  # PEFT's composition of the two
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm, "llama"), yab) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    fxpeft.save_adapter(gm, tmp_path, adapter_name="b")
    fxpeft.delete_adapter(gm, "a")
    fxpeft.set_adapter(gm, "b")
    assert rel_err(_run(gm, "llama"), yb) <= 1e-5  # the unmerge restored the base weights to rounding
    assert rel_err(_run(fxpeft.load_adapter(_graph("llama"), tmp_path), "llama"), yb) <= 1e-5
    fxpeft.delete_adapter(gm, "b")
    assert gm.code == base_code


def test_bf16_base_keeps_an_fp32_adapter_as_peft(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.BOFTConfig(boft_block_size=4, target_modules=["0", "2"],
                                                                     init_weights=False))
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(model, (x,)), tmp_path)
    assert all(p.dtype == torch.float32 for p in gm.parameters() if p.requires_grad)
    with torch.no_grad():
        got, ref = gm(x), pm(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) <= 1e-2 and rel_err(ref, model(x)) > 1e-2


def test_unfold_refuses_a_zero_scale():
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.BOFTConfig(target_modules=["q_proj"]))
    ad = next(iter(fxpeft.adapters(gm).values()))
    site = fxpeft.find_sites(gm)[ad.site_name]
    with torch.no_grad():
        ad.boft_s[3] = 0.0
    with pytest.raises(fxpeft.MergeError, match="boft_s"):
        PeftRegistry.get("boft").unfold(ad, site, gm.get_parameter(site.weight).detach(), None)
