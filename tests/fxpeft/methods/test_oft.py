"""OFT against PEFT 0.21: files both ways with the same outputs (Cayley–Neumann and exact Cayley, block_share, coft,
embeddings, either graph dialect, a bf16 base), the rotated weight the call reads, fold/unfold, conv OFT against an
eager reference, training and module dropout, the lifecycle, and typed refusals that leave the graph unchanged."""

from __future__ import annotations

import copy
import json
import warnings

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
from transformers.pytorch_utils import Conv1D

import fxpeft
from fxpeft.atomic import MANIFEST_NAME
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.oft import BlockDropout, coft_project, oft_blocks
from fxpeft.registry import PeftRegistry

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # deepcopy of an export graph

_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


CASES = {
    "neumann-block16": dict(oft_block_size=16),
    "exact-cayley-r4": dict(r=4, oft_block_size=0, use_cayley_neumann=False),
    "block-share": dict(oft_block_size=8, block_share=True),
    "coft": dict(oft_block_size=16, coft=True, eps=1e-2),
    "three-terms-adjusted-size": dict(oft_block_size=12, num_cayley_neumann_terms=3),  # 12 -> 8 on 64 and 128
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_fxpeft_oft_files_are_interchangeable(case, tmp_path):
    fields = CASES[case]
    model = _base("llama")[0]
    torch.manual_seed(1)
    cfg = peft.OFTConfig(init_weights=False, target_modules=_TARGETS, **fields)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = _run_model(pm, "llama")
    assert rel_err(ref, _run_model(model, "llama")) > 1e-3  # the adapter really changes the outputs

    gm = fxpeft.load_adapter(_graph("llama"), tmp_path / "peft")  # PEFT -> fxpeft
    got = _run(gm.eval(), "llama")
    assert rel_err(got, ref) <= 1e-5

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    assert rel_err(_run_model(pm2, "llama"), got) <= 1e-5
    ours = load_file(tmp_path / "fx" / WEIGHTS_NAME)
    theirs = {k: v for k, v in load_file(tmp_path / "peft" / WEIGHTS_NAME).items() if "oft_" in k}  # PEFT also
    # writes the targeted embedding's base weight
    assert ours.keys() == theirs.keys()
    for k in ours:  # with coft each call projects the parameter in place (as in PEFT): ours was saved after one
        want = coft_project(theirs[k], cfg.eps, cfg.oft_block_size) if cfg.coft else theirs[k]
        assert torch.equal(ours[k], want), k
    assert any(k.endswith("embed_tokens.oft_embedding_R.weight") for k in ours)
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "OFT"
    for k in ("r", "oft_block_size", "coft", "eps", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms"):
        assert config[k] == getattr(cfg, k), k

    again = fxpeft.load_adapter(_graph("llama"), tmp_path / "fx")  # fxpeft -> fxpeft: bit-exact
    y = _run(again.eval(), "llama")  # (coft projects again: a vector on the ball's edge moves by rounding)
    assert torch.equal(y, got) if not cfg.coft else rel_err(y, got) <= 1e-6
    assert fxpeft.get_nb_trainable_parameters(again)[0] == pm.get_nb_trainable_parameters()[0]


def test_a_linear_reads_its_rotated_input_and_a_peft_config_object_works():
    model = _base("llama")[0]
    cfg = peft.OFTConfig(oft_block_size=16, target_modules=["q_proj", "down_proj"])  # PEFT's default: zero init
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    assert torch.equal(_run(gm, "llama"), _run(_graph("llama"), "llama"))  # zero-init: exactly the base
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == peft_counts(model, cfg)[0]
    code = gm.code
    assert "q_proj_skew = torch.ops.aten.sub.Tensor" in code
    # training cost: the input is rotated per block (as PEFT), not the weight (its backward needs dL/dW')
    assert "q_proj_rotated = torch.ops.aten.bmm.default(model_layers_0_self_attn_q_proj_blocks_1" in code
    assert "linear.default(model_layers_0_self_attn_q_proj_rotated_2, model_layers_0_self_attn_q_proj_weight)" in code


class _TinyLM(nn.Module):
    """An embedding and two linears: a model symbolic_trace captures with ``call_module`` sites."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.up, self.down = nn.Embedding(50, 32), nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.emb(ids))))


@pytest.mark.filterwarnings("ignore")
def test_symbolic_trace_graph_rotates_the_activations_as_peft(tmp_path):
    torch.manual_seed(2)
    model, ids = _TinyLM().eval(), torch.randint(0, 50, (3, 7))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(
        oft_block_size=8, target_modules=["emb", "up", "down"], init_weights=False)).eval()
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(copy.deepcopy(model)), tmp_path)  # call_module sites: PEFT's own form
    with torch.no_grad():
        got, ref = gm.eval()(ids), pm(ids)
    assert "up_rotated" in gm.code and "emb_rotated" in gm.code and rel_err(got, ref) <= 1e-5
    fxpeft.merge_adapter(gm)
    with torch.no_grad():
        assert rel_err(gm(ids), ref) <= 1e-5


@pytest.mark.filterwarnings("ignore")
def test_fold_then_unfold_restores_the_weight_and_merge_matches_peft(tmp_path):
    model = _base("llama")[0]
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(
        oft_block_size=16, target_modules=_TARGETS, init_weights=False)).eval()
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(_graph("llama"), tmp_path).eval()
    oft = PeftRegistry.get("oft")
    sites = fxpeft.find_sites(gm)
    for ad in fxpeft.adapters(gm).values():
        site = sites[ad.site_name]
        w = gm.get_parameter(site.weight).detach().float()
        folded, _ = oft.fold(ad, site, w, None)
        assert rel_err(folded, w) > 1e-3
        back, _ = oft.unfold(ad, site, folded, None)  # Neumann's R is not orthogonal: a solve, not Rᵀ
        assert rel_err(back, w) <= 1e-6
    want = _run(gm, "llama")
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm, "llama"), want) <= 1e-5
    merged = pm.merge_and_unload()  # PEFT's exact fold is the same W·Rᵀ (E·R on the embedding)
    theirs = dict(merged.named_parameters())
    for ad in fxpeft.adapters(gm).values():
        name = sites[ad.site_name].weight
        assert rel_err(gm.get_parameter(name), theirs[name]) <= 1e-6, name
    fxpeft.unmerge_adapter(gm)
    for n, p in _base("llama")[3].named_parameters():
        assert rel_err(gm.get_parameter(n), p) <= 1e-6, n
    assert rel_err(_run(fxpeft.merge(gm), "llama"), want) <= 1e-5


def _conv_reference(model: nn.Module, rotations: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The CNN with each conv weight ``W [out, in, k, k]`` rotated over ``in·k·k``: ``W' = W_2d · blockdiag(R)ᵀ``."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, rot in rotations.items():
            conv = ref.get_submodule(name)
            w = conv.weight.flatten(1)
            conv.weight.copy_((w @ torch.block_diag(*rot).T).reshape(conv.weight.shape))
    return ref(x)


@pytest.mark.parametrize("dialect", ["export", "fx"])
def test_conv_oft_rotates_the_weight_and_warns_that_peft_differs(dialect, tmp_path):
    model, (x,), _, _ = _base("cnn")
    cfg = fxpeft.OFTConfig(r=3, oft_block_size=0, target_modules=["conv1", "conv3", "fc"], init_weights=False)
    g = _graph("cnn") if dialect == "export" else fxpeft.trace(copy.deepcopy(model))
    assert torch.equal(fxpeft.rewrite(copy.deepcopy(g), fxpeft.OFTConfig(r=3, oft_block_size=0, target_modules=[
        "conv1", "conv3"]))(x), model(x))  # zero init: exactly the base
    torch.manual_seed(4)
    gm = fxpeft.rewrite(g, cfg).eval()
    rotations = {}
    for ad in fxpeft.adapters(gm).values():
        if ad.kind == "conv":  # conv1: in·k·k = 27 in 3 blocks of 9; conv3: 32 in 3 -> 2 blocks of 16
            rotations[ad.site_name] = ad.block_matrix().transpose(1, 2)
    assert {k: v.shape for k, v in rotations.items()} == {"conv1": (3, 9, 9), "conv3": (2, 16, 16)}
    fc = [ad for ad in fxpeft.adapters(gm).values() if ad.kind == "linear"][0]
    with torch.no_grad():
        model_fc = copy.deepcopy(model)
        model_fc.fc.weight.copy_(model_fc.fc.weight @ torch.block_diag(*fc.block_matrix()))
        want = _conv_reference(model_fc, rotations, x)
        got = gm(x)
    assert rel_err(got, want) <= 1e-5 and rel_err(got, model(x)) > 1e-3
    fxpeft.merge_adapter(gm)
    with torch.no_grad():
        assert rel_err(gm(x), want) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    with pytest.warns(UserWarning, match="conv OFT"):
        fxpeft.save_adapter(gm, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["r"] == 3
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))  # PEFT loads the layout ...
    with torch.no_grad():
        assert rel_err(pm(x), want) > 1e-3  # ... but computes conv OFT differently (unfold/fold of patches)
    with pytest.warns(UserWarning, match="conv OFT"):
        again = fxpeft.load_adapter(_graph("cnn"), tmp_path)
    with torch.no_grad():
        assert rel_err(again(x), want) <= 1e-5


def test_a_few_steps_lower_the_loss_and_coft_keeps_the_parameter_projected():
    torch.manual_seed(0)
    cfg = fxpeft.OFTConfig(oft_block_size=16, target_modules=["q_proj", "v_proj", "down_proj"], module_dropout=0.25)
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    losses = lm_train_losses(gm, "llama", steps=4, lr=1e-2)
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for n, p in gm.named_parameters() if "oft_R" not in n)  # the base stays frozen

    gm = fxpeft.rewrite(_graph("llama"), fxpeft.OFTConfig(oft_block_size=16, target_modules=["q_proj"], coft=True,
                                                          eps=1e-3, init_weights=False))
    ad = next(iter(fxpeft.adapters(gm).values()))
    assert torch.linalg.vector_norm(ad.oft_R) > 1e-2
    _run(gm, "llama")  # each call projects the parameter into the ball, as PEFT does
    assert torch.equal(coft_project(ad.oft_R.detach(), 1e-3, 16), ad.oft_R.detach())
    radius = 1e-3 / 2 ** 0.5  # eps / sqrt(n blocks); ||Q||_F = sqrt(2)·||q||
    assert torch.all(torch.linalg.vector_norm(ad.oft_R, dim=1) * 2 ** 0.5 <= radius * (1 + 1e-5))


def test_module_dropout_is_training_only():
    torch.manual_seed(0)
    bd = BlockDropout(0.5)
    rot = torch.randn(4, 3, 3)
    assert torch.equal(bd.eval()(rot), rot)
    out = bd.train()(rot)
    same = [torch.equal(out[i], rot[i]) for i in range(4)]
    assert sum(same) == 2 and all(torch.equal(out[i], torch.eye(3)) for i in range(4) if not same[i])
    assert torch.equal(bd(rot[:1]), rot[:1])  # one shared block: untouched, as PEFT
    fields = dict(oft_block_size=16, target_modules=["q_proj", "v_proj"], init_weights=False)
    torch.manual_seed(0)
    plain = fxpeft.rewrite(_graph("llama"), fxpeft.OFTConfig(**fields))
    dropped = fxpeft.rewrite(_graph("llama"), fxpeft.OFTConfig(module_dropout=1.0, **fields))
    for a, b in zip(fxpeft.adapters(plain).values(), fxpeft.adapters(dropped).values()):
        b.load_state_dict(a.state_dict())
    assert torch.equal(_run(dropped.eval(), "llama"), _run(plain.eval(), "llama"))  # eval: no dropout
    assert torch.equal(_run(dropped.train(), "llama"), _run(_graph("llama").train(), "llama"))  # p = 1: all blocks I


def test_lifecycle_switch_stack_merge_delete_and_save(tmp_path):
    base = _run(_graph("llama"), "llama")
    base_code = _base("llama")[3].code
    gm = _graph("llama")
    fxpeft.rewrite(gm, fxpeft.OFTConfig(oft_block_size=16, target_modules=["q_proj", "v_proj"], init_weights=False),
                   "a")
    fxpeft.rewrite(gm, fxpeft.OFTConfig(oft_block_size=8, target_modules=["q_proj"], init_weights=False,
                                        use_cayley_neumann=False), "b")
    ya = _run(gm, "llama")
    fxpeft.set_adapter(gm, "b")
    yb = _run(gm, "llama")
    with fxpeft.disable_adapters(gm):
        assert torch.equal(_run(gm, "llama"), base)  # off: q = 0, R = I, W' = W exactly
    fxpeft.set_adapter(gm, ["a", "b"])  # two rotations of one weight
    yab = _run(gm, "llama")
    assert rel_err(yab, base) > 1e-3 and rel_err(yab, ya) > 1e-4 and rel_err(yab, yb) > 1e-4
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm, "llama"), yab) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    fxpeft.save_adapter(gm, tmp_path, adapter_name="b")
    fxpeft.delete_adapter(gm, "a")
    fxpeft.set_adapter(gm, "b")
    assert rel_err(_run(gm, "llama"), yb) <= 1e-6
    assert rel_err(_run(fxpeft.load_adapter(_graph("llama"), tmp_path), "llama"), yb) <= 1e-6
    fxpeft.delete_adapter(gm, "b")
    assert gm.code == base_code


@pytest.mark.filterwarnings("ignore")
def test_bf16_base_keeps_an_fp32_adapter_as_peft(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(oft_block_size=8, target_modules=["0", "2"],
                                                                    init_weights=False))
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(model, (x,)), tmp_path)
    assert all(p.dtype == torch.float32 for n, p in gm.named_parameters() if "oft_R" in n)
    with torch.no_grad():
        got, ref = gm(x), pm(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) <= 1e-2 and rel_err(ref, model(x)) > 1e-2


def test_hot_swap_replaces_the_weights_in_place(tmp_path):
    cfg = dict(oft_block_size=16, target_modules=["q_proj", "embed_tokens"], init_weights=False)
    torch.manual_seed(3)
    other = fxpeft.rewrite(_graph("llama"), fxpeft.OFTConfig(**cfg))
    fxpeft.save_adapter(other, tmp_path)
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.OFTConfig(**cfg))
    code = gm.code
    fxpeft.hotswap_adapter(gm, tmp_path)
    assert gm.code == code and torch.equal(_run(gm, "llama"), _run(other, "llama"))


def test_block_sizes_follow_peft():
    cfg = fxpeft.OFTConfig
    assert oft_blocks(cfg(), 64) == (2, 32, False)
    assert oft_blocks(cfg(oft_block_size=12), 64) == (8, 8, True)  # 8 and 16 are as near: the lower, as PEFT
    assert oft_blocks(cfg(oft_block_size=14), 64) == (4, 16, True)
    assert oft_blocks(cfg(oft_block_size=6), 27) == (9, 3, True) and oft_blocks(cfg(oft_block_size=100), 64)[1] == 64
    assert oft_blocks(cfg(r=3, oft_block_size=0), 27) == (3, 9, False)
    with pytest.warns(UserWarning, match="nearest divisor"):
        fxpeft.rewrite(_graph("llama"), cfg(oft_block_size=12, target_modules=["q_proj"]))


def test_refusals_are_typed_and_leave_the_graph_unchanged(tmp_path):
    gm = _graph("llama")
    snap = snapshot(gm)
    bad = [dict(r=4), dict(r=0, oft_block_size=0), dict(oft_block_size=-2), dict(oft_block_size=8.0),
           dict(module_dropout=1.5), dict(eps=-1.0), dict(coft="yes"), dict(block_share=1),
           dict(use_cayley_neumann=None), dict(num_cayley_neumann_terms=0), dict(init_weights="gaussian"),
           dict(bias="all")]
    for fields in bad:
        with pytest.raises(fxpeft.ConfigError):
            fxpeft.rewrite(gm, fxpeft.OFTConfig(target_modules=["q_proj"], **fields))
    assert_unchanged(gm, snap)
    g2 = fxpeft.trace(nn.Sequential(Conv1D(8, 16)), (torch.randn(2, 16),))  # GPT-2's layer, weight [in, out]
    snap2 = snapshot(g2)
    with pytest.raises(fxpeft.UnsupportedSiteError, match=r"\[in, out\]"):  # PEFT's OFT has no layer for it
        fxpeft.rewrite(g2, fxpeft.OFTConfig(oft_block_size=4, target_modules=["0"]))
    assert_unchanged(g2, snap2)
    cnn = _graph("cnn")
    with pytest.raises(fxpeft.UnsupportedSiteError, match="dilation"):
        fxpeft.rewrite(cnn, fxpeft.OFTConfig(oft_block_size=8, target_modules=["conv2"]))
    convs = _graph("convs")
    for target, why in (("c1", "Conv2d only"), ("g2", "grouped")):
        with pytest.raises(fxpeft.UnsupportedSiteError, match=why):
            fxpeft.rewrite(convs, fxpeft.OFTConfig(oft_block_size=4, target_modules=[target]))
    # a pre-0.14 OFT file (no oft_block_size) is refused, as PEFT does
    fxpeft.save_adapter(fxpeft.rewrite(_graph("llama"), fxpeft.OFTConfig(target_modules=["q_proj"])), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["oft_block_size"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    (tmp_path / MANIFEST_NAME).unlink()  # a file another tool wrote
    with pytest.raises(fxpeft.AdapterFileError, match="PEFT < 0.14"):
        fxpeft.load_adapter(gm, tmp_path)
    assert_unchanged(gm, snap)


def test_a_cayley_neumann_file_from_before_peft_0_18_warns(tmp_path):
    fxpeft.save_adapter(fxpeft.rewrite(_graph("llama"), fxpeft.OFTConfig(target_modules=["q_proj"])), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    oft = PeftRegistry.get("oft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fxpeft's own file says it holds 0.18's series; the exact form never changed
        oft.config_from_peft(config)
        oft.config_from_peft({**config, "peft_version": "0.17.1", "use_cayley_neumann": False})
    with pytest.warns(UserWarning, match="PEFT 0.18 changed the series"):
        oft.config_from_peft({**config, "peft_version": "0.17.1"})


def test_merge_adapter_on_a_bf16_conv_base_is_not_taken_for_a_tie():
    # an fp32 adapter on a bf16 conv adds conv(x, W' - W): its read of W is the adapter's own, not a second call site
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).to(torch.bfloat16)
    x = torch.randn(2, 2, 8, 8, dtype=torch.bfloat16)
    gm = fxpeft.rewrite(fxpeft.trace(model, (x,)), fxpeft.OFTConfig(oft_block_size=6, r=0, target_modules=["0"],
                                                                     init_weights=False))
    y = gm(x)
    fxpeft.merge_adapter(gm)
    assert rel_err(gm(x).float(), y.float()) <= 1e-2  # bf16 rounding of the folded weight
    fxpeft.unmerge_adapter(gm)
    assert rel_err(gm(x).float(), y.float()) <= 1e-2
