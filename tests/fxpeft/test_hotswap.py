"""Hot-swap: an adapter's weights replaced in place from files, with no new code and no recompile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
from conftest import assert_unchanged, out_tensor, rel_err, snapshot

import fxpeft
from fxpeft import zoo


def _saved(base, tmp_path, name, **cfg):
    gm = fxpeft.rewrite(copy.deepcopy(base), fxpeft.LoraConfig(init_lora_weights=False, **cfg))
    fxpeft.save_adapter(gm, tmp_path / name)
    return gm


@pytest.fixture(scope="module")
def llama():
    model, args, kwargs = zoo.tiny_llama(layers=1)
    return fxpeft.trace(model, args, kwargs), args, kwargs


def test_hotswap_under_compile_needs_no_code_and_no_recompile(llama, tmp_path):
    base, args, kwargs = llama
    targets = ["q_proj", "k_proj", "v_proj"]  # siblings: fused, so the padded ranks must re-fuse
    refs = {}
    for name, r, alpha, rs in (("r8", 8, 16, False), ("r2", 2, 5, True), ("r4", 4, 4, False)):
        refs[name] = out_tensor(_saved(base, tmp_path, name, r=r, lora_alpha=alpha, use_rslora=rs,
                                       target_modules=targets)(*args, **kwargs)).detach()
    gm = fxpeft.rewrite(copy.deepcopy(base), fxpeft.LoraConfig(r=4, target_modules=targets))
    fxpeft.prepare_for_hotswap(gm, target_rank=8)
    assert torch.equal(out_tensor(gm(*args, **kwargs)), out_tensor(base(*args, **kwargs)))  # padding changes nothing
    code = gm.code
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(gm, backend=counter)
    with torch.no_grad():
        compiled(*args, **kwargs)
        for name in ("r8", "r2", "r4", "r8"):
            fxpeft.hotswap_adapter(gm, tmp_path / name)
            assert gm.code == code
            assert rel_err(out_tensor(compiled(*args, **kwargs)), refs[name]) <= 1e-5
    assert counter.frame_count == 1
    torch._dynamo.reset()
    fxpeft.save_adapter(gm, tmp_path / "again")  # the file holds the swapped-in rank, not the room
    again = fxpeft.load_adapter(copy.deepcopy(base), tmp_path / "again")
    assert rel_err(out_tensor(again(*args, **kwargs)), refs["r8"]) <= 1e-5


def test_hotswap_refusals_leave_the_graph_unchanged(llama, tmp_path):
    base, args, kwargs = llama
    _saved(base, tmp_path, "big", r=16, target_modules=["q_proj", "v_proj"])
    _saved(base, tmp_path, "other", r=4, target_modules=["q_proj", "o_proj"])
    gm = fxpeft.rewrite(copy.deepcopy(base), fxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    fxpeft.prepare_for_hotswap(gm, target_rank=8)
    snap = snapshot(gm)
    for d, match in (("big", "rank 16 is larger"), ("other", "other sites"), ("nowhere", "does not exist")):
        with pytest.raises(fxpeft.AdapterFileError, match=match):
            fxpeft.hotswap_adapter(gm, tmp_path / d)
        assert_unchanged(gm, snap)
    with pytest.raises(fxpeft.AdapterFileError, match="no adapter named 'nme'"):
        fxpeft.hotswap_adapter(gm, tmp_path / "big", adapter_name="nme")


def test_hotswap_a_peft_file_gives_peft_outputs(llama, tmp_path):
    peft = pytest.importorskip("peft")
    base, args, kwargs = llama
    model, _, _ = zoo.tiny_llama(layers=1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=6, lora_alpha=12, init_lora_weights=False,
                                                                   target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    gm = fxpeft.rewrite(fxpeft.trace(model, args, kwargs), fxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fxpeft.prepare_for_hotswap(gm, target_rank=6)
    fxpeft.hotswap_adapter(gm, tmp_path / "peft")
    assert rel_err(out_tensor(gm(*args, **kwargs)), out_tensor(pm(*args, **kwargs))) <= 1e-5
