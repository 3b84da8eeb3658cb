"""FuseRMSNorm: the decomposed HF RMSNorm becomes one ``aten._fused_rms_norm``; outputs and gradients unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

import fxpeft
from fxpeft.passes import FuseRMSNorm
from fxpeft.zoo import tiny_gpt2, tiny_llama

from conftest import rel_err

FUSED = torch.ops.aten._fused_rms_norm.default


def _count(gm, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


@pytest.fixture(scope="module")
def llama():
    model, args, kwargs = tiny_llama(layers=2)
    return model, kwargs, fxpeft.trace(model, args, kwargs, fuse_rms_norm=False)


def test_fp32_norms_fuse_with_their_weight_and_give_the_same_outputs_and_grads(llama):
    model, kwargs, plain = llama
    fused = copy.deepcopy(plain)
    res = FuseRMSNorm()(fused)
    assert res.modified and not FuseRMSNorm()(fused).modified  # idempotent
    fused.graph.lint()
    assert _count(fused, FUSED) == 2 * 2 + 1 and _count(fused, torch.ops.aten.rsqrt.default) == 0
    # the weight joined the fused op: no weight product left behind
    assert all(n.args[2] is not None for n in fused.graph.nodes if n.target is FUSED)
    ref = model(**kwargs).logits
    assert rel_err(fused(**kwargs).logits, plain(**kwargs).logits) <= 1e-6
    assert rel_err(fused(**kwargs).logits, ref) <= 1e-6
    grads = []
    for gm in (plain, fused):
        gm.zero_grad()
        gm(**kwargs).logits.pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in gm.named_parameters() if p.grad is not None})
        gm.zero_grad()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for k in grads[0]:
        assert rel_err(grads[1][k], grads[0][k]) <= 1e-5, k


def test_trace_fuses_by_default_and_lora_ln_tuning_and_merge_still_work():
    model, args, kwargs = tiny_llama(layers=1)
    gm = fxpeft.trace(model, args, kwargs)
    assert _count(gm, FUSED) == 3
    sites = fxpeft.find_sites(gm, kinds={"norm"}).values()
    assert len([s for s in sites if s.kind == "norm"]) == 3  # LN tuning still sees every RMSNorm weight
    lora = fxpeft.rewrite(copy.deepcopy(gm), fxpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    unmerged = lora(**kwargs).logits
    merged = fxpeft.merge(lora)
    merged.graph.lint()
    assert rel_err(merged(**kwargs).logits, unmerged) <= 1e-5
    assert _count(merged, FUSED) == 3


def test_bf16_keeps_hf_rounding_order():
    model, args, kwargs = tiny_llama(layers=1)
    model = model.to(torch.bfloat16)
    plain = fxpeft.trace(model, args, kwargs, fuse_rms_norm=False)
    fused = copy.deepcopy(plain)
    assert FuseRMSNorm()(fused).modified
    # the cast to bf16 and the bf16 weight product stay outside the fp32 kernel, as HF computes them
    assert all(n.args[2] is None for n in fused.graph.nodes if n.target is FUSED)
    a, b = fused(**kwargs).logits.float(), plain(**kwargs).logits.float()
    assert rel_err(a, b) <= 1e-2
    assert rel_err(a, model(**kwargs).logits.float()) <= 1e-2


def test_graphs_without_rms_norm_are_left_alone():
    model, args, kwargs = tiny_gpt2()
    gm = fxpeft.trace(model, args, kwargs, fuse_rms_norm=False)
    code = gm.code
    assert not FuseRMSNorm()(gm).modified and gm.code == code


def test_fused_graph_exports_to_pt2(tmp_path):
    model, args, kwargs = tiny_llama(layers=1)
    gm = fxpeft.trace(model, args, kwargs)
    ref = gm(**kwargs).logits
    fxpeft.export(gm, tmp_path / "m.pt2", args, kwargs)
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert rel_err(loaded(**kwargs).logits, ref) <= 1e-6
