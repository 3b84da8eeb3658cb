"""Poly against PEFT 0.21: files both ways with the same outputs on a tiny Llama (several tasks in one batch, MHR
splits, eval and train-mode router), per-row routing, the ``task_ids`` graph input (missing or bad values,
removal with the last adapter, pickling, export, compile), training, the lifecycle, and typed refusals that
leave the graph unchanged."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from conftest import (
    assert_unchanged,
    out_tensor,
    peft_counts,
    rel_err,
    snapshot,
    traced_base,
    traced_copy,
)
from safetensors.torch import load_file
from torch import nn

import fxpeft
from fxpeft.errors import ConfigError, InputShapeError, MergeError, UnsupportedSiteError
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.poly import PolyAdapter, set_merge_task
from fxpeft.tags import graph_info

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # deepcopy of an export graph

FIELDS = dict(r=4, n_tasks=3, n_skills=3, n_splits=2, target_modules=["q_proj", "v_proj", "down_proj"])
TASKS = torch.tensor([0, 2, 1, 2])


def _ids() -> torch.Tensor:
    ids = traced_base("llama")[2]["input_ids"]
    return torch.cat([ids, ids.flip(0)])  # [4, T]: rows 0 and 3 hold the same tokens, under tasks 0 and 2


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory):
    """A PEFT Poly model with random skills and routers, saved; and its outputs on :data:`TASKS`."""
    model = traced_base("llama")[0]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.PolyConfig(task_type="CAUSAL_LM", init_weights=False,
                                                                   **FIELDS))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("module_logits"):  # PEFT's ±1e-3 init routes every task alike: make them differ
                p.normal_(0, 2)
    path = tmp_path_factory.mktemp("poly") / "peft"
    pm.eval().save_pretrained(str(path))
    with torch.no_grad():
        ref = pm(input_ids=_ids(), task_ids=TASKS).logits
    return model, pm, path, ref


def _run(gm, ids=None, tasks=TASKS) -> torch.Tensor:
    with torch.no_grad():
        return out_tensor(gm(input_ids=_ids() if ids is None else ids, task_ids=tasks))


def test_peft_and_fxpeft_poly_files_are_interchangeable(peft_files, tmp_path):
    model, pm, path, ref = peft_files
    with torch.no_grad():
        assert rel_err(ref, model(input_ids=_ids()).logits) > 1e-2  # the adapter really changes the outputs

    gm = fxpeft.load_adapter(traced_copy("llama"), path).eval()  # PEFT -> fxpeft
    got = _run(gm)
    assert rel_err(got, ref) <= 1e-5

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        assert rel_err(pm2(input_ids=_ids(), task_ids=TASKS).logits, got) <= 1e-5
    ours, theirs = load_file(tmp_path / "fx" / WEIGHTS_NAME), load_file(path / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(k.endswith("poly_router.module_logits") for k in ours)
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "POLY" and config["poly_type"] == "poly"
    assert {k: config[k] for k in ("r", "n_tasks", "n_skills", "n_splits")} == {
        k: FIELDS[k] for k in ("r", "n_tasks", "n_skills", "n_splits")}

    # training mode: PEFT's relaxed Bernoulli router, the same draws from the same seed
    pm.train(), gm.train()
    try:
        torch.manual_seed(5)
        theirs = pm(input_ids=_ids(), task_ids=TASKS).logits
        torch.manual_seed(5)
        ours = out_tensor(gm(input_ids=_ids(), task_ids=TASKS))
        assert rel_err(ours, theirs) <= 1e-5 and rel_err(ours, got) > 1e-4  # noisy routing differs from eval's
    finally:
        pm.eval()


def test_each_row_is_routed_by_its_own_task(peft_files):
    _, _, path, ref = peft_files
    gm = fxpeft.load_adapter(traced_copy("llama"), path).eval()
    ids = _ids()
    for b in range(len(TASKS)):  # row b alone (as a batch of two copies of it) gives row b of the mixed batch
        alone = _run(gm, ids[[b, b]], TASKS[[b, b]])
        assert rel_err(alone[0], ref[b]) <= 1e-5 and torch.equal(alone[0], alone[1])
    assert rel_err(ref[3], ref[0]) > 1e-3  # same tokens, tasks 2 and 0: the task changes the output
    perm = torch.tensor([2, 0, 3, 1])
    assert rel_err(_run(gm, ids[perm], TASKS[perm]), ref[perm]) <= 1e-5


def test_peft_config_object_zero_init_counts_and_training(peft_files):
    model = peft_files[0]
    config = peft.PolyConfig(task_type="CAUSAL_LM", **FIELDS)  # PEFT's own object, default init (B zero)
    gm = fxpeft.rewrite(traced_copy("llama"), config)
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, config)
    with torch.no_grad():
        base = out_tensor(traced_base("llama")[3](input_ids=_ids()))
    assert torch.equal(_run(gm.eval()), base)  # zero-init: exactly the base outputs

    gm.train()
    opt = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    ids, losses = _ids(), []
    torch.manual_seed(0)
    for _ in range(6):
        logits = out_tensor(gm(input_ids=ids, task_ids=TASKS))
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(m.poly_router.module_logits.grad is not None for m in fxpeft.adapters(gm).values())


# ------------------------------------------------------------------------------------------ small graphs


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


X = torch.randn(3, 5, 8)


def _mlp(export: bool = True):
    torch.manual_seed(0)
    model = Mlp().eval()  # eval: the router's deterministic form
    return model, fxpeft.trace(model, (torch.randn(2, 5, 8),) if export else ())


def _poly(**kw):
    return fxpeft.PolyConfig(**{**dict(r=2, n_tasks=3, n_skills=2, n_splits=2, target_modules=["up", "down"],
                                       init_weights=False), **kw})


def test_task_ids_input_travels_with_the_graph(tmp_path):
    _, gm = _mlp()
    torch.manual_seed(2)
    fxpeft.rewrite(gm, _poly()).eval()
    t = torch.tensor([2, 0, 1])
    y = gm(X, task_ids=t)
    assert "task_ids" in gm.code and graph_info(gm).inputs == ("task_ids",)
    for twin in (pickle.loads(pickle.dumps(gm)), copy.deepcopy(gm)):
        assert torch.equal(twin(X, task_ids=t), y)
    fxpeft.export(gm, tmp_path / "m.pt2", (X,), {"task_ids": t})
    pt2 = torch.export.load(tmp_path / "m.pt2").module()
    x4, t4 = torch.randn(4, 7, 8), torch.tensor([1, 1, 0, 2])
    assert rel_err(pt2(x4, task_ids=t4), gm(x4, task_ids=t4)) <= 1e-6
    compiled = torch.compile(gm, backend="eager", fullgraph=True)  # no graph break on the checks
    assert rel_err(compiled(X, task_ids=t), y) <= 1e-6

    # the same file in a symbolic_trace graph: the same outputs
    fxpeft.save_adapter(gm, tmp_path / "a")
    fx_gm = fxpeft.load_adapter(_mlp(export=False)[1], tmp_path / "a").eval()
    assert rel_err(fx_gm(X, task_ids=t), y) <= 1e-6


@pytest.mark.parametrize("export", [True, False])
def test_lifecycle_and_the_input_going_with_the_last_adapter(export):
    model, gm = _mlp(export)
    code, t = gm.code, torch.tensor([0, 1, 2])
    fxpeft.rewrite(gm, _poly(), "a")
    fxpeft.rewrite(gm, _poly(n_tasks=5), "b").eval()  # added, not active (PEFT's add_adapter); same input
    assert list(gm.code.split("def forward")[1].split(")")[0].split(",")).count(" task_ids = None") == 1
    with torch.no_grad():
        with fxpeft.disable_adapters(gm):
            assert torch.equal(gm(X, task_ids=t), model(X))
        y = gm(X, task_ids=t)
        snap = snapshot(gm)
        with pytest.raises(MergeError, match="task_ids.*set_merge_task"):
            fxpeft.merge_adapter(gm)
        assert_unchanged(gm, snap)
        with pytest.raises(MergeError, match="cannot be merged"):
            fxpeft.merge(gm, "a")
        assert_unchanged(gm, snap)
        with pytest.raises(UnsupportedSiteError, match="mixed-batch"):
            gm(X, adapter_names=["a", "b", "a"], task_ids=t)
        fxpeft.delete_adapter(gm, "b")
        assert torch.equal(gm(X, task_ids=t), y) and graph_info(gm).inputs == ("task_ids",)
        fxpeft.unload(gm)  # the last Poly adapter: task_ids goes too, the code is the base's again
        assert gm.code == code and graph_info(gm).inputs == ()
        assert torch.equal(gm(X), model(X))


def test_bad_task_ids_are_typed_errors_naming_the_keyword():
    _, gm = _mlp()
    fxpeft.rewrite(gm, _poly())
    for bad, match in ((None, "forward keyword task_ids="), (torch.tensor([0.0, 1.0, 2.0]), "1-D int64"),
                       (torch.tensor([[0, 1, 2]]), "1-D int64"), (torch.tensor([0, 1]), "task_ids has 2 entries"),
                       (torch.tensor([0, 1, 3]), "task id 3.*n_tasks=3"), (torch.tensor([0, -1, 1]), "task id -1")):
        with pytest.raises(InputShapeError, match=match):
            gm(X) if bad is None else gm(X, task_ids=bad)


def test_bad_configs_and_sites_are_typed_errors_with_the_graph_unchanged():
    _, gm = _mlp()
    snap = snapshot(gm)
    for kw, match in ((dict(r=0), "r must be"), (dict(n_tasks=0), "n_tasks"), (dict(n_skills=-1), "n_skills"),
                      (dict(n_splits=1.5), "n_splits"), (dict(poly_type="mhr"), "poly_type"),
                      (dict(init_weights="yes"), "init_weights")):
        with pytest.raises(ConfigError, match=match):
            fxpeft.rewrite(gm, _poly(**kw))
        assert_unchanged(gm, snap)
    with pytest.raises(UnsupportedSiteError, match="not divisible by n_splits=3"):
        fxpeft.rewrite(gm, _poly(n_splits=3))  # in=8 at "up"
    assert_unchanged(gm, snap)

    from transformers.pytorch_utils import Conv1D

    others = fxpeft.trace(nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), Conv1D(8, 16), nn.Embedding(5, 4)))
    snap = snapshot(others)
    for target, match in (("0", "a conv site"), ("2", r"stored \[in, out\] \(Conv1D\)"), ("3", "a embedding site")):
        with pytest.raises(UnsupportedSiteError, match=match):
            fxpeft.rewrite(others, _poly(n_splits=1, target_modules=[target]))
        assert_unchanged(others, snap)


def test_adapter_modules_hold_peft_shapes():
    _, gm = _mlp()
    fxpeft.rewrite(gm, _poly(r=3, n_tasks=4, n_skills=5, n_splits=2))
    up = next(m for m in fxpeft.adapters(gm).values() if isinstance(m, PolyAdapter) and m.site_name == "up")
    assert tuple(up.poly_lora_A.shape) == (2, 5, 4, 3) and tuple(up.poly_lora_B.shape) == (2, 5, 3, 6)
    assert tuple(up.poly_router.module_logits.shape) == (4, 10)


def test_one_task_merges_and_unmerges():
    _, gm = _mlp()
    fxpeft.rewrite(gm, _poly()).eval()
    code, t = _mlp()[1].code, torch.tensor([0, 2, 1])
    with torch.no_grad():
        y = gm(X, task_ids=t)
        task_1 = gm(X, task_ids=torch.tensor([1, 1, 1]))
        for bad in (3, -1, 1.0, True, "1"):
            with pytest.raises(ConfigError, match="task id"):
                set_merge_task(gm, bad)
        set_merge_task(gm, 1)
        fxpeft.merge_adapter(gm)  # every row gets task 1 from the weights; the graph adds nothing
        assert rel_err(gm(X, task_ids=t), task_1) <= 1e-6
        with pytest.raises(ConfigError, match="unmerge them first"):
            set_merge_task(gm, 0)
        fxpeft.unmerge_adapter(gm)
        assert rel_err(gm(X, task_ids=t), y) <= 1e-6
        merged = fxpeft.merge(gm)  # merge_and_unload for task 1: no adapter, no task_ids
        assert merged.code == code and rel_err(merged(X), task_1) <= 1e-6
