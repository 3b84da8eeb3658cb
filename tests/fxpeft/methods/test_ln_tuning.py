"""LN tuning against PEFT 0.21: files both ways with the same outputs (Llama's decomposed RMSNorm, GPT-2's and
BERT's LayerNorm, nn.LayerNorm/GroupNorm/RMSNorm in either graph dialect), the exact base output of a fresh
adapter, merge/unmerge, training, PEFT's trainable count, and typed refusals that leave the graph unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    assert_unchanged,
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
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.ln_tuning import LNTuningAdapter
from fxpeft.sites import SITE_KINDS

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),  # deepcopy of an export graph
              pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning")]  # PEFT, on every norm

#: zoo model -> target_modules (None: PEFT's default for the model type; BERT has none)
TARGETS = {"llama": None, "gpt2": None, "bert": ["LayerNorm"]}


@torch.no_grad()
def _run(gm, name: str) -> torch.Tensor:
    _, args, kwargs, _ = _base(name)
    return out_tensor(gm(*args, **kwargs))


@torch.no_grad()
def _perturb(module: nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor (the tuned copies) away from the base values."""
    torch.manual_seed(seed)
    for p in module.parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn_like(p))


class OwnRMSNorm(nn.Module):
    """An RMS norm written out (as HF's): ``weight * x * rsqrt(mean(x²) + eps)``, traced through in both dialects."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class NormMLP(nn.Module):
    """A plain module with the three torch norms (symbolic_trace keeps them as ``call_module``) and a written-out one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.gn = nn.Linear(8, 16), nn.LayerNorm(16), nn.GroupNorm(4, 16)
        self.rms, self.act, self.fc2 = nn.RMSNorm(16), nn.ReLU(), nn.Linear(16, 4)
        self.plain, self.own = nn.LayerNorm(16, elementwise_affine=False), OwnRMSNorm(16)

    def forward(self, x):
        return self.fc2(self.own(self.plain(self.rms(self.act(self.gn(self.ln(self.fc1(x))))))))


def _mlp():
    torch.manual_seed(0)
    return NormMLP().eval(), torch.randn(3, 8)


@pytest.mark.parametrize("name", list(TARGETS))
def test_a_fresh_adapter_gives_exactly_the_base_output(name):
    gm = fxpeft.rewrite(_graph(name), fxpeft.LNTuningConfig(target_modules=TARGETS[name]))
    assert torch.equal(_run(gm, name), _run_model(_base(name)[0], name))
    assert all(isinstance(m, LNTuningAdapter) for m in fxpeft.adapters(gm).values())


@pytest.mark.parametrize("name", list(TARGETS))
def test_peft_and_fxpeft_files_are_interchangeable(name, tmp_path):
    model, base = _base(name)[0], _run_model(_base(name)[0], name)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig(target_modules=TARGETS[name]))
    _perturb(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = _run_model(pm, name)
    assert rel_err(ref, base) > 1e-2  # the tuned norms really change the outputs

    gm = fxpeft.load_adapter(_graph(name), tmp_path / "peft")  # PEFT -> fxpeft
    got = _run(gm, name)
    assert rel_err(got, ref) <= 1e-5

    gm = fxpeft.rewrite(_graph(name), fxpeft.LNTuningConfig(target_modules=TARGETS[name]))  # fxpeft -> PEFT
    _perturb(gm, seed=2)
    mine = _run(gm, name)
    fxpeft.save_adapter(gm, tmp_path / "fx")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    assert rel_err(_run_model(pm2, name), mine) <= 1e-5
    ours, theirs = load_file(tmp_path / "fx" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(".ln_tuning_layers." in k for k in ours)
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LN_TUNING"
    again = fxpeft.load_adapter(_graph(name), tmp_path / "fx")  # save -> load is bit-exact
    assert torch.equal(_run(again, name), mine)


def test_merge_is_exact_and_unmerge_gives_the_base_back():
    gm = fxpeft.rewrite(_graph("gpt2"), fxpeft.LNTuningConfig())
    _perturb(gm)
    tuned, base = _run(gm, "gpt2"), _run_model(_base("gpt2")[0], "gpt2")
    weight = gm.get_parameter("transformer.ln_f.weight").detach().clone()
    fxpeft.merge_adapter(gm)
    assert torch.equal(_run(gm, "gpt2"), tuned)
    with fxpeft.disable_adapters(gm):  # the base values while disabled, as in PEFT
        assert torch.equal(_run(gm, "gpt2"), base)
    fxpeft.unmerge_adapter(gm)
    assert torch.equal(gm.get_parameter("transformer.ln_f.weight"), weight)
    assert torch.equal(_run(gm, "gpt2"), tuned)
    code = _graph("gpt2").code
    fxpeft.merge(gm)  # fold and remove: the base graph's code, with the tuned values in the base tensors
    assert gm.code == code and not fxpeft.adapters(gm)
    assert torch.equal(_run(gm, "gpt2"), tuned)


def test_training_lowers_the_loss_and_counts_match_peft():
    model, args, kwargs, _ = _base("llama")
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.LNTuningConfig()).train()
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, peft.LNTuningConfig())
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    ids = kwargs["input_ids"]
    losses = []
    for _ in range(5):
        logits = out_tensor(gm(*args, **kwargs))
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad for n, p in gm.named_parameters() if "ln_tuning" not in n)


def test_a_peft_config_object_works_and_sites_are_opt_in():
    gm = _graph("bert")
    assert not any(s.kind == "norm" for s in fxpeft.find_sites(gm).values())  # other methods see no norm sites
    layers = [f"encoder.layer.{i}.{p}.LayerNorm" for i in (0, 1) for p in ("attention.output", "output")]
    norms = {s.name for s in fxpeft.find_sites(gm, SITE_KINDS).values() if s.kind == "norm"}
    assert norms == {"embeddings.LayerNorm", *layers}
    config = peft.LNTuningConfig(target_modules=["output.LayerNorm"], exclude_modules=["attention.output.LayerNorm"])
    gm = fxpeft.rewrite(gm, config)
    assert sorted(m.site_name for m in fxpeft.adapters(gm).values()) == layers[1::2]
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(_base("bert")[0], config)


@pytest.mark.parametrize("with_inputs", [False, True], ids=["symbolic_trace", "export"])
def test_torch_norms_in_either_dialect_match_peft(with_inputs, tmp_path):
    model, x = _mlp()
    trace = (lambda: fxpeft.trace(model, (x,))) if with_inputs else (lambda: fxpeft.trace(model))
    targets = ["ln", "gn", "rms", "own"]
    gm = fxpeft.rewrite(trace(), fxpeft.LNTuningConfig(target_modules=targets))
    assert torch.equal(gm(x), model(x))
    _perturb(gm)
    mine = gm(x).detach()
    fxpeft.save_adapter(gm, tmp_path / "fx")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    assert rel_err(pm(x), mine) <= 1e-5 and rel_err(mine, model(x)) > 1e-2

    pm = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig(target_modules=targets))
    _perturb(pm, seed=3)
    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = fxpeft.load_adapter(trace(), tmp_path / "peft")
    assert rel_err(loaded(x), pm(x)) <= 1e-5
    fxpeft.merge_adapter(loaded)
    assert rel_err(loaded(x), pm(x)) <= 1e-6


def test_bad_targets_are_typed_errors_and_leave_the_graph_unchanged():
    model, x = _mlp()
    cases = [(["nope"], fxpeft.TargetError),  # matches no module
             (["act"], fxpeft.TargetError),  # a module without parameters
             (["plain"], fxpeft.TargetError),  # a norm without an affine weight: nothing to tune
             (["ln", "fc1"], fxpeft.UnsupportedSiteError)]  # not a norm: PEFT copies it whole, fxpeft refuses
    for trace in (lambda: fxpeft.trace(model), lambda: fxpeft.trace(model, (x,))):
        gm = trace()
        snap = snapshot(gm)
        for targets, error in cases:
            with pytest.raises(error):
                fxpeft.rewrite(gm, fxpeft.LNTuningConfig(target_modules=targets))
            assert_unchanged(gm, snap)
    gm = _graph("cnn")  # batch norm: not an LN tuning site (its running statistics are not tuned)
    snap = snapshot(gm)
    with pytest.raises(fxpeft.TargetError):
        fxpeft.rewrite(gm, fxpeft.LNTuningConfig(target_modules=["bn1"]))
    assert_unchanged(gm, snap)
    gm = _graph("gpt2")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="modules_to_save"):  # PEFT's LLaVA default tunes lm_head
        fxpeft.rewrite(gm, fxpeft.LNTuningConfig(target_modules=["ln_f", "lm_head"]))
    assert_unchanged(gm, snap)


def test_two_adapters_switch_like_peft(tmp_path):
    model, x = _mlp()
    gm = fxpeft.trace(model, (x,))
    for name, seed in (("a", 1), ("b", 2)):
        gm = fxpeft.rewrite(gm, fxpeft.LNTuningConfig(target_modules=["ln", "rms"]), adapter_name=name)
        _perturb(gm, seed)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig(target_modules=["ln", "rms"]))
    for name in ("a", "b"):
        fxpeft.save_adapter(gm, tmp_path / name, adapter_name=name)
        pm.load_adapter(str(tmp_path / name), adapter_name=name)
    for name in ("b", "a"):
        fxpeft.set_adapter(gm, name)
        pm.set_adapter(name)
        assert rel_err(gm(x), pm(x)) <= 1e-5
    fxpeft.delete_adapter(gm, "a")
    fxpeft.delete_adapter(gm, "b")
    assert gm.code == fxpeft.trace(model, (x,)).code and torch.equal(gm(x), model(x))


def test_hotswap_works_and_mixed_batches_and_weighted_merges_refuse(tmp_path):
    model, x = _mlp()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig(target_modules=["ln", "gn"]))
    _perturb(pm)
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.rewrite(fxpeft.trace(model, (x,)), fxpeft.LNTuningConfig(target_modules=["ln", "gn"]))
    code = gm.code
    fxpeft.hotswap_adapter(gm, tmp_path)  # the norms' shapes: any file of the same targets fits
    assert gm.code == code and rel_err(gm(x), pm(x)) <= 1e-5
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="mixed-batch"):
        fxpeft.mixed_batch(gm)
    with pytest.raises(fxpeft.ConfigError, match="weighted merges"):
        fxpeft.add_weighted_adapter(gm, ["default"], [0.5], "half", combination_type="linear")
    assert_unchanged(gm, snap)
