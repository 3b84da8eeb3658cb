"""Every rewrite entry point is atomic under any exception: a fault injected at each step of a pass leaves
``gm.code``, the state dict, the module tree, trainable flags and node tags exactly as they were."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from fxpeft.passes import (
    FuseLowRankSiblings,
    MergeAdapters,
    RemoveAdapters,
    UnfuseLowRankSiblings,
)
from torch import fx

import fxpeft
from fxpeft import zoo
from fxpeft.registry import PeftRegistry
from fxpeft.tags import get_tag


class Fault(Exception):
    pass


def full_snapshot(gm: fx.GraphModule):
    return (gm.code, {k: v.detach().clone() for k, v in gm.state_dict().items()},
            [n for n, _ in gm.named_modules()], {n: p.requires_grad for n, p in gm.named_parameters()},
            [(n.name, get_tag(n)) for n in gm.graph.nodes])


def assert_same(gm: fx.GraphModule, snap) -> None:
    code, state, modules, grads, tags = snap
    assert gm.code == code
    now = gm.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert [n for n, _ in gm.named_modules()] == modules
    assert {n: p.requires_grad for n, p in gm.named_parameters()} == grads
    assert [(n.name, get_tag(n)) for n in gm.graph.nodes] == tags
    gm.graph.lint()


# (owner, attribute): the steps a pass takes while it mutates.
STEPS = [(fx.Graph, "create_node"), (fx.Graph, "erase_node"), (fx.Node, "replace_all_uses_with"),
         (fx.Node, "replace_input_with"), (fx.GraphModule, "add_submodule"), (fx.GraphModule, "delete_submodule"),
         (fx.GraphModule, "recompile"), (torch.Tensor, "copy_")]


def count_calls(monkeypatch, action, gm) -> dict:
    counts = dict.fromkeys(STEPS, 0)
    for owner, name in STEPS:
        orig = getattr(owner, name)

        def wrapped(*a, _orig=orig, _key=(owner, name), **k):
            counts[_key] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(owner, name, wrapped)
    action(gm)
    monkeypatch.undo()
    return counts


def inject_fault(monkeypatch, step, k: int) -> None:
    owner, name = step
    orig, calls = getattr(owner, name), itertools.count()

    def faulty(*a, **kw):
        if next(calls) == k:
            raise Fault(f"{name} #{k}")
        return orig(*a, **kw)

    monkeypatch.setattr(owner, name, faulty)


def each_fault(monkeypatch, make, action, per_step: int = 4):
    """Run ``action`` on a fresh graph with a fault at spread-out calls of every step it takes."""
    counts = count_calls(monkeypatch, action, make())
    assert sum(counts.values()) > 0
    tried = 0
    for step, n in counts.items():
        for k in sorted({0, n // 3, 2 * n // 3, n - 1} if n else ())[:per_step]:
            gm = make()
            snap = full_snapshot(gm)
            inject_fault(monkeypatch, step, k)
            try:
                action(gm)
            except Fault:
                pass
            else:
                pytest.fail(f"fault at {step[1]} #{k} did not fire")
            finally:
                monkeypatch.undo()
            assert_same(gm, snap)
            tried += 1
    return tried


@pytest.fixture(scope="module")
def llama():
    model, args, kwargs = zoo.tiny_llama(layers=1)
    return model, fxpeft.trace(model, args, kwargs)


def test_rewrite_is_atomic_at_every_step(monkeypatch, llama):
    _, base = llama
    config = fxpeft.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False)
    tried = each_fault(monkeypatch, lambda: copy.deepcopy(base), lambda gm: fxpeft.rewrite(gm, config))
    assert tried >= 10


def test_rewrite_is_atomic_when_a_method_fails_inside_insert(monkeypatch, llama):
    _, base = llama
    gm = copy.deepcopy(base)
    snap = full_snapshot(gm)
    lora = PeftRegistry.get("lora")
    orig, calls = lora.insert.__func__, itertools.count()

    def insert(cls, emit, site, adapter):
        if next(calls) == 3:  # a bug in a method, half-way through the sites
            raise KeyError("method bug")
        return orig(cls, emit, site, adapter)

    monkeypatch.setattr(lora, "insert", classmethod(insert))
    with pytest.raises(KeyError):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, target_modules="all-linear"))
    assert_same(gm, snap)


def adapted(base):
    def make():
        gm = copy.deepcopy(base)
        return fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return make


@pytest.mark.parametrize("name,action", [
    ("merge", lambda gm: MergeAdapters()(gm)),
    ("remove", lambda gm: RemoveAdapters()(gm)),
    ("unfuse", lambda gm: UnfuseLowRankSiblings()(gm)),
    ("refuse", lambda gm: FuseLowRankSiblings()(UnfuseLowRankSiblings()(gm).graph_module)),
])
def test_merge_remove_fuse_are_atomic_at_every_step(monkeypatch, llama, name, action):
    _, base = llama
    make = adapted(base)
    if name == "refuse":  # fault inside the fusion only: start from an unfused graph
        def make():
            gm = copy.deepcopy(base)
            return fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                                  fuse=False)
        action = lambda gm: FuseLowRankSiblings()(gm)  # noqa: E731
    assert each_fault(monkeypatch, make, action) >= 4


def test_load_adapter_is_atomic_at_every_step(monkeypatch, llama, tmp_path):
    _, base = llama
    src = adapted(base)()
    fxpeft.save_adapter(src, tmp_path)
    tried = each_fault(monkeypatch, lambda: copy.deepcopy(base), lambda gm: fxpeft.load_adapter(gm, tmp_path))
    assert tried >= 10


def _small_graph() -> fx.GraphModule:
    return fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))),
                          fxpeft.LoraConfig(r=2, target_modules=["0", "2"], lora_dropout=0.1))


@pytest.mark.parametrize("damage", ["missing_get_attr", "call_module_not_a_module", "out_of_order", "duplicate_name"])
def test_fast_lint_fails_where_torch_lint_fails_with_torch_error(damage):
    from fxpeft.passes.transaction import lint

    gm = _small_graph()
    lint(gm)  # a sound graph passes
    nodes = list(gm.graph.nodes)
    if damage == "missing_get_attr":
        next(n for n in nodes if n.op == "get_attr").target += "_gone"
    elif damage == "call_module_not_a_module":
        next(n for n in nodes if n.op == "call_module").target = next(n for n in nodes if n.op == "get_attr").target
    elif damage == "out_of_order":
        user = next(n for n in nodes if n.op == "call_function" and n.all_input_nodes)
        user.all_input_nodes[0].prepend(user)
    else:
        nodes[-2].name = nodes[1].name
    with pytest.raises(RuntimeError) as torch_error:
        gm.graph.lint()
    with pytest.raises(RuntimeError) as ours:
        lint(gm)
    assert str(ours.value) == str(torch_error.value)


@pytest.mark.parametrize("enabled", [True, False])
def test_transaction_pauses_gc_and_restores_it(enabled):
    import gc

    from fxpeft.passes.transaction import transaction

    gm = fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        with transaction(gm):
            assert not gc.isenabled()  # no whole-heap collections mid-pass
        assert gc.isenabled() == enabled
        with pytest.raises(Fault), transaction(gm):
            raise Fault("boom")
        assert gc.isenabled() == enabled  # restored on rollback too
    finally:
        (gc.enable if was else gc.disable)()
