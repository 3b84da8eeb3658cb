"""AdaLoRA against PEFT 0.21: files both ways with the same outputs (Llama linear, GPT-2 Conv1D, Conv2d), the same
rank allocation as PEFT's step by step (budgets, masks, losses with the orthogonal regulariser), files with a
``rank_pattern`` both ways, the exact fold, training, and typed refusals that leave the graph unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    assert_unchanged,
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
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.adalora import AdaLoraAdapter
from fxpeft.registry import PeftRegistry

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # deepcopy of an export graph

_SCHEDULE = dict(init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=2)


def _same_files(a, b) -> None:
    ours, theirs = load_file(a / WEIGHTS_NAME), load_file(b / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


CASES = {
    "llama": ("llama", dict(init_r=4, target_r=2, total_step=10, lora_alpha=6,
                            target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2-conv1d": ("gpt2", dict(init_r=3, target_r=1, total_step=10, lora_alpha=0.5,  # a ΔW near W's size
                                 target_modules=["c_attn", "c_proj"])),
    "cnn-conv2d": ("cnn", dict(init_r=3, target_r=2, total_step=10, target_modules=["conv1", "conv2", "conv3", "fc"])),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_fxpeft_adalora_files_are_interchangeable(case, tmp_path):
    base, fields = CASES[case]
    model = _base(base)[0]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(init_lora_weights=False, **fields)).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = _run_model(pm, base)
    assert rel_err(ref, _run_model(model, base)) > 1e-3  # the adapter really changes the outputs

    gm = fxpeft.load_adapter(_graph(base), tmp_path / "peft")  # PEFT -> fxpeft
    got = _run(gm.eval(), base)
    assert rel_err(got, ref) <= 1e-5

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    assert rel_err(_run_model(pm2, base), got) <= 1e-5
    _same_files(tmp_path / "fx", tmp_path / "peft")
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] is None
    for k in ("init_r", "target_r", "total_step", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
              "lora_alpha"):
        assert config[k] == fields.get(k, getattr(peft.AdaLoraConfig(total_step=1), k)), k

    again = fxpeft.load_adapter(_graph(base), tmp_path / "fx")  # fxpeft -> fxpeft: bit-exact
    assert torch.equal(_run(again.eval(), base), got)
    assert fxpeft.get_nb_trainable_parameters(again)[0] == pm.get_nb_trainable_parameters()[0]


@pytest.mark.filterwarnings("ignore")
def test_a_symbolic_trace_graph_loads_the_same_file(tmp_path):
    model = _base("cnn")[0]
    pm = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(
        init_r=2, target_r=1, total_step=5, target_modules=["conv1", "fc"], init_lora_weights=False)).eval()
    pm.save_pretrained(str(tmp_path))
    gm = fxpeft.load_adapter(fxpeft.trace(copy.deepcopy(model)), tmp_path)  # call_module sites, torch.* functions
    assert rel_err(_run(gm.eval(), "cnn"), _run_model(pm, "cnn")) <= 1e-5


def _train_both(tmp_path):
    """PEFT's model and fxpeft's graph from one random init, trained side by side with PEFT's schedule."""
    model = _base("llama")[0]
    ids = _base("llama")[2]["input_ids"]
    torch.manual_seed(2)
    cfg = peft.AdaLoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", lora_alpha=4,
                             target_modules=["q_proj", "v_proj", "down_proj"], **_SCHEDULE)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    pm.save_pretrained(str(tmp_path / "init"))
    gm = fxpeft.load_adapter(_graph("llama"), tmp_path / "init")
    pm.train(), gm.train()
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    opt_g = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    peft_E = [m.lora_E["default"] for m in pm.modules() if isinstance(getattr(m, "lora_E", None), nn.ParameterDict)]
    ours = list(fxpeft.adapters(gm).values())
    history = []
    for step in range(_SCHEDULE["total_step"] + 1):
        out = pm(input_ids=ids, labels=ids)  # PEFT adds the orthogonal regulariser to the loss in forward
        out.loss.backward()
        opt_p.step()
        pm.base_model.update_and_allocate(step)
        opt_p.zero_grad()

        logits = gm(input_ids=ids).logits
        ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss = ce + fxpeft.adalora_orth_loss(gm)  # the user adds it here
        loss.backward()
        opt_g.step()
        budget = fxpeft.update_and_allocate(gm, step)
        opt_g.zero_grad()

        peft_budget = pm.base_model.rankallocator.budget_schedule(step)[0]
        masks = (torch.cat([(e == 0).flatten() for e in peft_E]), torch.cat([(m.E == 0).flatten() for m in ours]))
        history.append((step, out.loss.item(), loss.item(), peft_budget, budget, *masks,
                        rel_err(logits.detach(), out.logits.detach())))
    return model, pm, gm, history


@pytest.mark.filterwarnings("ignore")
def test_rank_allocation_follows_peft_step_by_step_and_files_carry_the_rank_pattern(tmp_path):
    model, pm, gm, history = _train_both(tmp_path)
    for step, peft_loss, loss, peft_budget, budget, peft_mask, mask, logits_err in history:
        assert budget == peft_budget, step  # the cubic schedule from 4 per site (24) down to 2 (12)
        assert torch.equal(mask, peft_mask), step  # the same triplets zeroed (E == 0) after each allocation
        assert abs(loss - peft_loss) <= 1e-5 * abs(peft_loss), step  # task loss + orth_reg_weight · regulariser
        assert logits_err <= 1e-5, step
    assert [h[4] for h in history] == [24, 24, 18, 14, 12, 12, 12, 12, 12]
    assert history[-1][6].sum() == 12  # half of the 24 triplets masked at the end
    final = {k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    ours = {f"{m.site_name}.lora_E": m.file_mask() for m in fxpeft.adapters(gm).values()}
    assert ours == final

    pm.eval(), gm.eval()  # files after allocation: only the kept triplets, and the rank_pattern
    pm.save_pretrained(str(tmp_path / "peft"))
    fxpeft.save_adapter(gm, tmp_path / "fx")
    theirs = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())["rank_pattern"]
    assert json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())["rank_pattern"] == theirs == final
    a, b = load_file(tmp_path / "fx" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert sum(v.shape[0] for k, v in a.items() if k.endswith("lora_E")) == 12

    ref = _run_model(peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")), "llama")
    loaded = fxpeft.load_adapter(_graph("llama"), tmp_path / "peft").eval()  # PEFT's resize_modules_by_rank_pattern
    assert rel_err(_run(loaded, "llama"), ref) <= 1e-5
    assert sorted(m.r for m in fxpeft.adapters(loaded).values()) == sorted(sum(v) for v in final.values())
    assert all(m.ranknum == 4 for m in fxpeft.adapters(loaded).values() if m.r)  # the scaling is the initial one
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    assert rel_err(_run_model(pm2, "llama"), _run(gm, "llama")) <= 1e-5  # fxpeft's trained graph = PEFT's reload
    fxpeft.save_adapter(loaded, tmp_path / "again")  # a resized adapter writes the same file back
    _same_files(tmp_path / "again", tmp_path / "peft")
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text())["rank_pattern"] == final


def test_zero_init_is_exact_a_peft_config_object_works_and_counts_match():
    model = _base("llama")[0]
    cfg = peft.AdaLoraConfig(init_r=6, target_r=2, total_step=20, lora_dropout=0.1,
                             target_modules=["q_proj", "k_proj", "up_proj"])
    gm = fxpeft.rewrite(_graph("llama"), cfg)  # PEFT's default: E zero
    assert torch.equal(_run(gm.eval(), "llama"), _run(_graph("llama"), "llama"))
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == peft_counts(model, cfg)[0]
    code = gm.code
    assert "q_proj_E_scaled = torch.ops.aten.mul.Tensor(model_layers_0_self_attn_q_proj_E_row" in code
    fused = "aten.cat.default([model_layers_0_self_attn_q_proj_lora_A, model_layers_0_self_attn_k_proj_lora_A"
    assert fused in code  # q and k share one down matmul (passes.fuse)
    assert "q_proj.adalora_default.dropout(" in code  # a call_module on the adapter's nn.Dropout
    assert all(isinstance(m.dropout, nn.Dropout) for m in fxpeft.adapters(gm).values())


@pytest.mark.parametrize("case", ["llama", "gpt2-conv1d", "cnn-conv2d"])
def test_fold_is_exact_and_merge_matches(case):
    base, fields = CASES[case]
    torch.manual_seed(0)
    gm = fxpeft.rewrite(_graph(base), fxpeft.AdaLoraConfig(init_lora_weights=False, **fields)).eval()
    method = PeftRegistry.get("adalora")
    sites = fxpeft.find_sites(gm)
    for ad in fxpeft.adapters(gm).values():
        with torch.no_grad():  # standard-normal factors give a ΔW ~100x W; keep it W-sized for the round trip
            ad.A.mul_(0.1), ad.B.mul_(0.1)
        site = sites[ad.site_name]
        w = gm.get_parameter(site.weight).detach().float()
        folded, _ = method.fold(ad, site, w, None)
        delta = (ad.B @ (ad.A * ad.E)).detach() * ad.scaling / (ad.ranknum + 1e-5)  # PEFT's get_delta_weight
        delta = delta.reshape(w.shape) if site.kind == "conv" else (delta.T if site.fan_in_fan_out else delta)
        assert rel_err(folded - w, delta) <= 1e-6
        assert rel_err(method.unfold(ad, site, folded, None)[0], w) <= 1e-6
    want = _run(gm, base)
    fxpeft.merge_adapter(gm)
    assert rel_err(_run(gm, base), want) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    assert rel_err(_run(fxpeft.merge(gm), base), want) <= 1e-5


def test_a_few_steps_lower_the_loss_and_the_base_stays_frozen():
    torch.manual_seed(0)
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=6, tinit=1, lora_alpha=32, lora_dropout=0.05,
        target_modules=["q_proj", "v_proj", "down_proj"]))
    ids = _base("llama")[2]["input_ids"]
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=2e-2)
    gm.train()
    losses = []
    for step in range(6):
        logits = gm(input_ids=ids).logits
        task = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        (task + fxpeft.adalora_orth_loss(gm)).backward()
        opt.step()
        fxpeft.update_and_allocate(gm, step)
        opt.zero_grad()
        losses.append(task.item())
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for p in gm.parameters() if not p.requires_grad)
    assert {n.rsplit(".", 1)[-1] for n, p in gm.named_parameters() if p.requires_grad} == {"A", "E", "B"}


def test_training_loop_misuse_is_refused():
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.AdaLoraConfig(target_modules=["q_proj"], **_SCHEDULE))
    with pytest.raises(fxpeft.ConfigError, match="after loss.backward"):
        fxpeft.update_and_allocate(gm, 0)  # no gradients yet
    with pytest.raises(fxpeft.ConfigError, match="no AdaLoRA adapter"):
        fxpeft.adalora_orth_loss(_graph("llama"))
    fxpeft.rewrite(gm, fxpeft.AdaLoraConfig(target_modules=["v_proj"], **_SCHEDULE), "other")
    with pytest.raises(fxpeft.ConfigError, match="adapter_name"):
        fxpeft.adalora_orth_loss(gm)
    assert fxpeft.adalora_orth_loss(gm, "other").item() > 0


def test_refusals_are_typed_and_leave_the_graph_unchanged():
    gm = _graph("llama")
    snap = snapshot(gm)
    ok = dict(target_modules=["q_proj"], total_step=10)
    bad = [dict(total_step=None), dict(total_step=0), dict(tinit=6, tfinal=4), dict(target_r=13),
           dict(init_r=0), dict(deltaT=0), dict(beta1=1.0), dict(beta2=0), dict(orth_reg_weight=-1),
           dict(lora_dropout=1.0), dict(init_lora_weights="gaussian"), dict(rank_pattern={"q_proj": 4}),
           dict(rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True] * 3}),
           dict(rank_pattern={"model.layers.0.mlp.up_proj.lora_E": [True] * 12})]  # names no targeted site
    for fields in bad:
        with pytest.raises(fxpeft.ConfigError):
            fxpeft.rewrite(gm, fxpeft.AdaLoraConfig(**{**ok, **fields}))
    with pytest.raises(fxpeft.UnsupportedSiteError, match="embeddings"):
        fxpeft.rewrite(gm, fxpeft.AdaLoraConfig(target_modules=["embed_tokens", "q_proj"], total_step=10))
    assert_unchanged(gm, snap)
    convs = _graph("convs")  # a Conv1d and a grouped Conv2d: PEFT's AdaLoRA has no layer for either
    for target in ("c1", "g2"):
        with pytest.raises(fxpeft.UnsupportedSiteError, match="ungrouped nn.Conv2d"):
            fxpeft.rewrite(convs, fxpeft.AdaLoraConfig(target_modules=[target], total_step=10))
    with pytest.raises(ValueError, match="total_step"):  # PEFT's own check, for comparison
        peft.AdaLoraConfig(target_modules=["q_proj"])


def test_a_peft_file_with_unsupported_fields_is_refused(tmp_path):
    torch.manual_seed(0)
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.AdaLoraConfig(target_modules=["q_proj"], total_step=10))
    fxpeft.save_adapter(gm, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / ".fxpeft-manifest.json").unlink()  # the config is edited below on purpose
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(fxpeft.AdapterFileError, match="bias"):
        fxpeft.load_adapter(_graph("llama"), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "total_step": None}))
    with pytest.raises(fxpeft.AdapterFileError, match="total_step"):
        fxpeft.load_adapter(_graph("llama"), tmp_path)
    assert isinstance(next(iter(fxpeft.adapters(gm).values())), AdaLoraAdapter)
