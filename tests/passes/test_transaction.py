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
