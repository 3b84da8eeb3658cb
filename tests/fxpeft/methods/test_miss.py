"""MiSS against PEFT 0.21: files both ways with the same outputs in its three forms (MiSS with a partial last shard,
mini, bat), zero init, merge/unmerge against PEFT's, a symbolic_trace graph, training and dropout, and typed refusals
that leave the graph unchanged."""

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
from fxpeft.methods.miss import shard_sum
from fxpeft.methods.oft import _eager

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),  # deepcopy of an export graph
              pytest.mark.filterwarnings("ignore:.*is not in the common layers pattern")]

_TARGETS = ["q_proj", "v_proj", "down_proj"]
CASES = {
    "miss-partial-shard": dict(r=6),  # 64 and 128 inputs: 6 does not divide them, the last shard is cut
    "mini": dict(r=4, init_weights="mini", mini_r=8),
    "bat": dict(r=8, init_weights="bat"),
}


@torch.no_grad()
def _run(gm, name: str) -> torch.Tensor:
    _, args, kwargs, _ = _base(name)
    return out_tensor(gm(*args, **{k: v for k, v in kwargs.items() if k != "use_cache"}))


def _peft_model(model: nn.Module, seed: int, **fields):
    """A PEFT MiSS model with random (non-zero) blocks: PEFT's inits for bat and mini are zeros."""
    pm = peft.get_peft_model(copy.deepcopy(model), peft.MissConfig(**fields)).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "miss_block" in n:
                p.normal_(0, 0.05)
    return pm


@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_fxpeft_miss_files_are_interchangeable(case, tmp_path):
    model, fields = _base("llama")[0], CASES[case]
    pm = _peft_model(model, 1, target_modules=_TARGETS, **fields)
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = _run_model(pm, "llama")
    assert rel_err(ref, _run_model(model, "llama")) > 1e-2  # the adapter really changes the outputs

    gm = fxpeft.load_adapter(_graph("llama"), tmp_path / "peft")  # PEFT -> fxpeft
    got = _run(gm.eval(), "llama")
    assert rel_err(got, ref) <= 1e-5

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    assert rel_err(_run_model(pm2, "llama"), got) <= 1e-5
    ours, theirs = load_file(tmp_path / "fx" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(k.endswith(".miss_block") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "MISS"
    assert config["init_weights"] == fields.get("init_weights", True) and config["r"] == fields["r"]

    again = fxpeft.load_adapter(_graph("llama"), tmp_path / "fx")  # fxpeft -> fxpeft: bit-exact
    assert torch.equal(_run(again.eval(), "llama"), got)
    assert fxpeft.get_nb_trainable_parameters(again)[0] == pm.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("init", [True, "mini", "bat"])
def test_zero_init_is_exactly_the_base_and_a_peft_config_object_works(init):
    model = _base("llama")[0]
    cfg = peft.MissConfig(r=8, init_weights=init, mini_r=16, target_modules=["q_proj", "down_proj"])
    gm = fxpeft.rewrite(_graph("llama"), cfg)
    assert torch.equal(_run(gm, "llama"), _run(_graph("llama"), "llama"))
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == peft_counts(model, cfg)[0]
    code = gm.code
    if init == "bat":  # the call reads W' = W_blocks·(I + B) + B
        assert "linear.default(" in code and "q_proj_bat_weight_1)" in code
    else:  # PEFT's form: y + S(x)·B
        assert "q_proj_shard_sum = torch.ops.aten.sum.dim_IntList(" in code and "q_proj_out = " in code


def test_shard_sum_is_the_tiled_block():
    x, r = torch.randn(3, 10), 4
    block = torch.randn(r, 5)
    delta = block.t().repeat(1, 3)[:, :10]  # ΔW [out, in]: Bᵀ once per shard, the last cut to in
    assert torch.allclose(shard_sum(_eager, x, r, 10) @ block, x @ delta.t(), atol=1e-6)


@pytest.mark.parametrize("case", ["miss-partial-shard", "bat"])
def test_merge_and_unmerge_match_peft(case, tmp_path):
    model = _base("llama")[0]
    pm = _peft_model(model, 2, target_modules=_TARGETS, **CASES[case])
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(_graph("llama"), tmp_path).eval()
    want = _run(gm, "llama")
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm, "llama"), want) <= 1e-5
    sites = fxpeft.find_sites(gm)
    theirs = dict(pm.merge_and_unload().named_parameters())
    for ad in fxpeft.adapters(gm).values():
        name = sites[ad.site_name].weight
        assert rel_err(gm.get_parameter(name), theirs[name]) <= 1e-6, name
    fxpeft.unmerge_adapter(gm)  # bat: PEFT's (W' - B)(I + B)⁻¹
    for n, p in _base("llama")[3].named_parameters():
        assert rel_err(gm.get_parameter(n), p) <= 1e-6, n
    assert rel_err(_run(fxpeft.merge(gm), "llama"), want) <= 1e-5


class _TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("case", ["miss-partial-shard", "bat"])
def test_symbolic_trace_graph_matches_peft(case, tmp_path):
    torch.manual_seed(5)
    model, x = _TinyMLP().eval(), torch.randn(3, 16)
    fields = dict(CASES[case], r=4 if case == "bat" else 6)
    pm = _peft_model(model, 3, target_modules=["up", "down"], **fields)
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(copy.deepcopy(model)), tmp_path).eval()  # call_module sites
    with torch.no_grad():
        got, ref = gm(x), pm(x)
    assert rel_err(got, ref) <= 1e-5 and rel_err(ref, model(x)) > 1e-2
    assert ("up_delta_weight" in gm.code) == (case == "bat")  # bat: y + linear(x, W' - W)
    fxpeft.merge_adapter(gm)
    with torch.no_grad():
        assert rel_err(gm(x), ref) <= 1e-5


@pytest.mark.parametrize("fields", [dict(r=8, miss_dropout=0.1), dict(r=8, init_weights="bat")], ids=["miss", "bat"])
def test_a_few_steps_lower_the_loss_and_dropout_is_training_only(fields):
    torch.manual_seed(0)
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.MissConfig(target_modules=_TARGETS, **fields))
    losses = lm_train_losses(gm, "llama", steps=4, lr=1e-2)
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for n, p in gm.named_parameters() if "miss_block" not in n)
    if fields.get("miss_dropout"):
        assert "miss_dropout = " in gm.code
        gm.eval()
        assert torch.equal(_run(gm, "llama"), _run(gm, "llama"))  # eval: the dropout passes x through
        gm.train()
        assert not torch.equal(_run(gm, "llama"), _run(gm, "llama"))


def test_refusals_are_typed_and_leave_the_graph_unchanged():
    gm = _graph("llama")
    snap = snapshot(gm)
    for fields in [dict(r=0), dict(r=4.0), dict(mini_r=0), dict(miss_dropout=1.0), dict(init_weights="gaussian"),
                   dict(bias="all")]:
        with pytest.raises(fxpeft.ConfigError):
            fxpeft.rewrite(gm, fxpeft.MissConfig(target_modules=["q_proj"], **fields))
    with pytest.raises(fxpeft.UnsupportedSiteError, match="embedding"):
        fxpeft.rewrite(gm, fxpeft.MissConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(fxpeft.UnsupportedSiteError, match="in_features"):  # r > 64
        fxpeft.rewrite(gm, fxpeft.MissConfig(r=65, target_modules=["q_proj"]))
    with pytest.raises(fxpeft.UnsupportedSiteError, match="r x r blocks"):  # 6 does not divide 64
        fxpeft.rewrite(gm, fxpeft.MissConfig(r=6, init_weights="bat", target_modules=["q_proj"]))
    with pytest.raises(fxpeft.UnsupportedSiteError, match="mini_r"):
        fxpeft.rewrite(gm, fxpeft.MissConfig(r=4, init_weights="mini", mini_r=48, target_modules=["q_proj"]))
    assert_unchanged(gm, snap)
    cnn = _graph("cnn")
    with pytest.raises(fxpeft.UnsupportedSiteError, match="conv"):  # PEFT's MiSS adapts nn.Linear only
        fxpeft.rewrite(cnn, fxpeft.MissConfig(r=2, target_modules=["conv1"]))
    flm, args, _ = zoo.functional_lm()
    with pytest.raises(fxpeft.UnsupportedSiteError, match=r"\[in, out\]"):  # x @ W (as HF Conv1D): no PEFT layer
        fxpeft.rewrite(fxpeft.trace(flm, args), fxpeft.MissConfig(r=4, target_modules=["blocks.0.w_out"]))
