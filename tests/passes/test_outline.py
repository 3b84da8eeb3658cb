"""Outlining repeated blocks (passes/outline.py): exact outputs and gradients, dynamic shapes, moved (not copied)
state, the inverse pass, and the adapter lifecycle and files on an outlined graph."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from conftest import assert_unchanged, out_tensor, rel_err, snapshot, traced_copy
from fxpeft.passes import InlineBlocks, OutlineBlocks
from fxpeft.passes.outline import OutlinedBlock, outlined_blocks, repeated_blocks
from safetensors.torch import load_file

import fxpeft

pytest.importorskip("transformers")
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def _llama():
    return fxpeft.rewrite(traced_copy("llama"), fxpeft.LoraConfig(**LORA))


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))


def _run(gm, ids):
    return out_tensor(gm(input_ids=ids))


def test_outlined_llama_is_exact_at_two_shapes_and_owns_its_layers():
    flat = _llama()
    gm = copy.deepcopy(flat)
    params = {k: v.data_ptr() for k, v in gm.state_dict().items()}
    res = OutlineBlocks()(gm)
    assert res.modified and not OutlineBlocks()(gm).modified  # idempotent
    gm.graph.lint()
    blocks = outlined_blocks(gm)
    assert sorted(blocks) == ["model.layers.0", "model.layers.1"]
    assert isinstance(gm.get_submodule("model.layers.1"), OutlinedBlock)
    # the block owns its layer's base weights and adapters: moved, same tensors, same state-dict keys
    assert {k: v.data_ptr() for k, v in gm.state_dict().items()} == params
    assert len(fxpeft.adapters(gm.get_submodule("model.layers.0"))) == 2 and len(fxpeft.adapters(gm)) == 4
    assert len(gm.code) < len(flat.code) / 3
    root_calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("model.layers")]
    assert [n.target for n in root_calls] == ["model.layers.0", "model.layers.1"]
    for batch, seq in [(2, 16), (3, 7)]:  # dynamic shapes survive outlining
        ids = _ids(batch, seq)
        assert torch.equal(_run(gm, ids), _run(flat, ids))


def test_gradients_to_adapters_equal_the_flat_graph():
    flat = _llama()
    gm = copy.deepcopy(flat)
    OutlineBlocks()(gm)
    ids = _ids(2, 16)
    for g in (flat, gm):
        g.train()
        _run(g, ids).logsumexp(-1).mean().backward()
    grads = {k: p.grad for k, p in gm.named_parameters() if p.grad is not None}
    want = {k: p.grad for k, p in flat.named_parameters() if p.grad is not None}
    assert grads.keys() == want.keys() and len(grads) == 8  # A and B of q/v in 2 layers, nothing else
    assert all(torch.equal(grads[k], want[k]) for k in grads)


def test_gpt2_outlines_exactly():
    flat = fxpeft.rewrite(traced_copy("gpt2"), fxpeft.LoraConfig(r=4, target_modules=["c_attn"],
                                                                  init_lora_weights=False))
    gm = copy.deepcopy(flat)
    OutlineBlocks()(gm)
    assert sorted(outlined_blocks(gm)) == ["transformer.h.0", "transformer.h.1"]
    gm.graph.lint()
    for batch, seq in [(2, 16), (1, 9)]:
        ids = _ids(batch, seq)
        assert torch.equal(_run(gm, ids), _run(flat, ids))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)

    def forward(self, x):
        return x + torch.relu(self.fc(self.norm(x)))


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        self.layers = torch.nn.ModuleList([_Block() for _ in range(3)])

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


@pytest.mark.parametrize("dialect", ["fx", "export"])
def test_both_dialects_outline_a_module_list(dialect):
    torch.manual_seed(0)
    model, x = _Stack(), torch.randn(5, 4)
    gm = fxpeft.trace(model) if dialect == "fx" else fxpeft.trace(model, (x,))
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False))
    ref = gm(x)
    OutlineBlocks()(gm)
    assert sorted(outlined_blocks(gm)) == ["layers.0", "layers.1", "layers.2"]
    assert sum(n.op == "call_module" and n.target.startswith("layers.") for n in gm.graph.nodes) == 3
    assert torch.equal(gm(x), ref)


def test_a_block_that_is_not_convex_stays_flat_with_a_warning():
    torch.manual_seed(0)
    model, x = _Stack(), torch.randn(5, 4)
    gm = fxpeft.trace(model, (x,))
    ref = gm(x)
    def innermost(n):
        return list((n.meta.get("nn_module_stack") or {"": ("", None)}).values())[-1][0]

    head = [n for n in gm.graph.nodes if innermost(n) == "head"]
    layer0 = next(n.meta["nn_module_stack"] for n in gm.graph.nodes if innermost(n).startswith("layers.0"))
    assert head
    for n in head:  # the head claims to be part of layers.0: layers.1 and .2 then read and feed that block
        n.meta["nn_module_stack"] = dict(layer0)
    with pytest.warns(UserWarning, match=r"left 1 block\(s\) flat \(\['layers.0'\]"):
        assert OutlineBlocks()(gm).modified
    assert sorted(outlined_blocks(gm)) == ["layers.1", "layers.2"]
    gm.graph.lint()
    assert torch.equal(gm(x), ref)


def test_inline_restores_the_flat_graph():
    flat = _llama()
    gm = copy.deepcopy(flat)
    OutlineBlocks()(gm)
    assert InlineBlocks()(gm).modified and not InlineBlocks()(gm).modified
    assert not outlined_blocks(gm) and len(gm.graph.nodes) == len(flat.graph.nodes)
    assert list(gm.state_dict()) == list(flat.state_dict())
    assert type(gm.get_submodule("model.layers.0")) is torch.nn.Module
    ids = _ids(2, 16)
    assert torch.equal(_run(gm, ids), _run(flat, ids))


def test_a_graph_without_repeated_blocks_is_left_alone():
    gm = traced_copy("cnn")
    snap = snapshot(gm)
    assert repeated_blocks(gm) == {} and not OutlineBlocks()(gm).modified
    assert_unchanged(gm, snap)


def test_adapter_files_and_lifecycle_work_on_an_outlined_graph(tmp_path):
    flat = _llama()
    gm = copy.deepcopy(flat)
    OutlineBlocks()(gm)
    ids = _ids(2, 16)
    ref = _run(flat, ids)
    fxpeft.save_adapter(flat, tmp_path / "flat")
    fxpeft.save_adapter(gm, tmp_path / "outlined")  # inlined for the call, outlined again after
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("flat", "outlined"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(outlined_blocks(gm)) == ["model.layers.0", "model.layers.1"]
    # load into a fresh outlined base: the same outputs, bit for bit
    other = traced_copy("llama")
    OutlineBlocks()(other)
    fxpeft.load_adapter(other, tmp_path / "outlined")
    assert outlined_blocks(other) and torch.equal(_run(other, ids), ref)
    # disable_adapters: the base outputs
    with fxpeft.disable_adapters(gm):
        assert torch.equal(_run(gm, ids), _run(traced_copy("llama"), ids))
    # merge_adapter / unmerge_adapter / merge keep the blocks and the outputs
    fxpeft.merge_adapter(gm)
    assert outlined_blocks(gm) and rel_err(_run(gm, ids), ref) <= 1e-5
    with fxpeft.disable_adapters(gm):  # merged: taken out of the weights for the block (inlined), put back after
        assert rel_err(_run(gm, ids), _run(traced_copy("llama"), ids)) <= 1e-5
    assert outlined_blocks(gm) and rel_err(_run(gm, ids), ref) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    merged = fxpeft.merge(copy.deepcopy(gm))
    assert outlined_blocks(merged) and not fxpeft.adapters(merged) and rel_err(_run(merged, ids), ref) <= 1e-5
    # a second adapter rewritten onto the outlined graph lands inside the blocks; deleting it restores the outputs
    before = _run(gm, ids)  # (unmerge subtracts the delta in fp32: not bit-exact with ref)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), "k")
    fxpeft.set_adapter(gm, ["default", "k"])
    assert len(fxpeft.adapters(gm.get_submodule("model.layers.0"))) == 3
    assert not torch.equal(_run(gm, ids), before)
    fxpeft.delete_adapter(gm, "k")
    assert torch.equal(_run(gm, ids), before)


def test_outlined_graph_pickles_and_copies_with_its_blocks():
    gm = _llama()
    OutlineBlocks()(gm)
    ids = _ids(2, 16)
    ref = _run(gm, ids)
    f = io.BytesIO()
    torch.save(gm, f)
    f.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = torch.load(f, weights_only=False)
    for g in (back, copy.deepcopy(gm)):
        assert sorted(outlined_blocks(g)) == ["model.layers.0", "model.layers.1"]
        assert len(fxpeft.adapters(g)) == 4 and torch.equal(_run(g, ids), ref)
    InlineBlocks()(back)  # the block record survived the pickle
    assert torch.equal(_run(back, ids), ref)


def test_shard_refuses_without_a_process_group_and_leaves_the_graph_flat():
    gm = _llama()
    snap = snapshot(gm)
    with pytest.raises(fxpeft.ConfigError, match="init_process_group"):
        fxpeft.shard(gm)
    assert_unchanged(gm, snap)
