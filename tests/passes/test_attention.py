"""Attention normalisation (passes/attention.py): causal masks become ``is_causal``, repeated K/V ``enable_gqa``.

Every rewrite is checked against the same model traced with ``normalize_attention=False``: forward and
gradients, rel ≤ 1e-6, with and without padding, at the traced shape and at others (the proofs are symbolic).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import out_tensor, rel_err
from fxpeft.passes import NormalizeAttention
from fxpeft.passes import attention as attention_pass
from torch import nn

import fxpeft
from fxpeft.zoo import tiny_bert, tiny_gpt2, tiny_llama

SDPA = torch.ops.aten.scaled_dot_product_attention.default
TOL = 1e-6


def _sdpa_calls(gm) -> list[dict]:
    """Each SDPA call's arguments by name."""
    return [attention_pass._sdpa_arguments(n) for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]


def _pair(model, kwargs):
    """The model traced with the pass (default) and without it."""
    return fxpeft.trace(model, (), kwargs), fxpeft.trace(model, (), kwargs, normalize_attention=False)


def _llama():
    model, _, kw = tiny_llama(layers=2, hidden=64, vocab=128, batch=3, seq=12, seed=0)  # 4 heads, 2 KV heads
    return model.float(), kw["input_ids"]


@pytest.fixture(scope="module")
def llama_pair():
    """``(model, ids, on, off)``: the tiny Llama traced without padding, with and without the pass (read-only:
    deep-copy a graph before changing it)."""
    model, ids = _llama()
    return (model, ids, *_pair(model, {"input_ids": ids, "use_cache": False}))


def _padding(ids: torch.Tensor, side: str | None) -> torch.Tensor | None:
    if side is None:
        return None
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 5)[: ids.shape[0]]):  # one unpadded row, the others padded
        if pad and side == "left":
            mask[row, :pad] = 0
        elif pad:
            mask[row, -pad:] = 0
    return mask


def _inputs(ids: torch.Tensor, side: str | None) -> dict:
    kw = {"input_ids": ids}
    if side is not None:
        kw["attention_mask"] = _padding(ids, side)
    return kw


def _loss_and_grads(gm, kw, params):
    logits = out_tensor(gm(**kw))
    loss = (logits.float().sin() * torch.linspace(0.5, 1.5, logits.shape[-1])).mean()
    return logits, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("side", [None, "left", "right"])
def test_llama_equal_to_unnormalised_forward_and_backward(side, llama_pair):
    if side is None:
        model, ids, on, off = llama_pair
    else:
        model, ids = _llama()
        on, off = _pair(model, {**_inputs(ids, side), "use_cache": False})
    calls = _sdpa_calls(on)
    assert len(calls) == 2 and all(c["enable_gqa"] and c["key"].meta["val"].shape[1] == 2 for c in calls)
    # Without padding the mask is proved causal and dropped; a padding mask reads the input: kept.
    assert all((c["attn_mask"] is None and c["is_causal"]) == (side is None) for c in calls)
    params = [p for p in model.parameters() if p.requires_grad]
    for shape in ((3, 12), (2, 7), (4, 19)):  # the traced shape, and others: the graphs are dynamic
        other = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(shape[1]))
        kw = _inputs(other, side)
        got, got_grads = _loss_and_grads(on, kw, params)
        want, want_grads = _loss_and_grads(off, kw, params)
        assert torch.isfinite(want).all()
        assert rel_err(got, want) <= TOL
        for g, w in zip(got_grads, want_grads):
            assert rel_err(g, w) <= TOL


def test_llama_graph_loses_the_mask_and_repeat_kv(llama_pair):
    _, _, on, off = llama_pair
    ops = lambda gm: [n.target for n in gm.graph.nodes if n.op == "call_function"]  # noqa: E731
    for op in (torch.ops.aten.index.Tensor, torch.ops.aten.diff.default, torch.ops.aten.cumsum.default,
               torch.ops.aten.le.Tensor, torch.ops.aten.expand.default):
        assert op in ops(off) and op not in ops(on), op
    assert len(on.graph.nodes) < len(off.graph.nodes)
    on.graph.lint()


def test_idempotent_and_a_pass_on_the_unnormalised_graph_gives_the_traced_code(llama_pair):
    _, _, on, off = llama_pair
    on, off = copy.deepcopy(on), copy.deepcopy(off)
    first = NormalizeAttention()(off)
    assert first.modified
    off.graph.lint()
    assert off.code == on.code
    code = on.code
    assert not NormalizeAttention()(on).modified
    assert on.code == code


def test_each_rewrite_alone(llama_pair):
    _, ids, _, off = llama_pair
    causal = NormalizeAttention(gqa=False)(copy.deepcopy(off)).graph_module
    grouped = NormalizeAttention(causal=False)(copy.deepcopy(off)).graph_module
    assert all(c["is_causal"] and not c["enable_gqa"] for c in _sdpa_calls(causal))
    assert all(c["enable_gqa"] and c["attn_mask"] is not None for c in _sdpa_calls(grouped))
    for gm in (causal, grouped):
        assert rel_err(out_tensor(gm(input_ids=ids)), out_tensor(off(input_ids=ids))) <= TOL


def test_gpt2_mask_becomes_is_causal():
    model, _, kw = tiny_gpt2()
    on, off = _pair(model, kw)
    assert all(c["is_causal"] and c["attn_mask"] is None and not c["enable_gqa"] for c in _sdpa_calls(on))
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 256, (3, 9))
    got, got_grads = _loss_and_grads(on, {"input_ids": ids}, params)
    want, want_grads = _loss_and_grads(off, {"input_ids": ids}, params)
    assert rel_err(got, want) <= TOL
    assert all(rel_err(g, w) <= TOL for g, w in zip(got_grads, want_grads))


def test_bert_bidirectional_padding_mask_is_left_alone():
    model, _, kw = tiny_bert()
    on, off = _pair(model, kw)
    assert on.code == off.code
    assert not NormalizeAttention()(off).modified
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    ids = torch.randint(0, 256, (3, 7))
    assert torch.equal(out_tensor(on(input_ids=ids, attention_mask=mask)), out_tensor(model(ids, attention_mask=mask)))


def test_sliding_window_mask_is_kept():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=64)
    model = MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 12))
    on, off = _pair(model, {"input_ids": ids, "use_cache": False})
    calls = _sdpa_calls(on)
    assert calls and all(c["attn_mask"] is not None and not c["is_causal"] for c in calls)  # i - j < 4: not causal
    assert all(c["enable_gqa"] for c in calls)
    for shape in ((2, 12), (3, 3)):  # a window wider than the sequence is causal there, not for every length
        other = torch.randint(0, 128, shape)
        want = model(input_ids=other, use_cache=False).logits
        assert rel_err(out_tensor(on(input_ids=other)), want) <= TOL


class _Attention(nn.Module):
    """One head of self-attention whose mask ``make_mask(q_positions, k_positions, ids)`` builds."""

    def __init__(self, make_mask):
        super().__init__()
        self.make_mask = make_mask
        self.proj = nn.Linear(8, 24)

    def forward(self, x, ids):
        q, k, v = self.proj(x).unsqueeze(1).chunk(3, dim=-1)
        pos = torch.arange(x.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.make_mask(pos[:, None], pos[None, :], ids))


MASKS = {  # name: (mask builder, provably causal)
    "le": (lambda i, j, ids: j <= i, True),
    "ge-reversed": (lambda i, j, ids: i >= j, True),
    "tril": (lambda i, j, ids: torch.ones(i.shape[0], j.shape[1], dtype=torch.bool).tril(), True),
    "float-inf": (lambda i, j, ids: torch.zeros(i.shape[0], j.shape[1]).masked_fill(j > i, float("-inf")), True),
    "strict": (lambda i, j, ids: j < i, False),  # the diagonal masked too
    "first-row-all": (lambda i, j, ids: (j <= i) | (i == 0), False),
    "window": (lambda i, j, ids: (j <= i) & (i - j < 3), False),
    "data": (lambda i, j, ids: (j <= i) & (ids[:, None, None, :] > 0), False),
    "finfo-min": (lambda i, j, ids: torch.zeros(i.shape[0], j.shape[1]).masked_fill(j > i, torch.finfo().min), False),
    "bidirectional": (lambda i, j, ids: (j <= i) | (j > i), False),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_custom_masks_rewritten_only_when_proved_causal(name):
    make_mask, causal = MASKS[name]
    torch.manual_seed(0)
    model = _Attention(make_mask)
    x, ids = torch.randn(2, 6, 8), torch.randint(0, 5, (2, 6))
    on, off = _pair(model, {"x": x, "ids": ids})
    (call,) = _sdpa_calls(on)
    assert call["is_causal"] == causal and (call["attn_mask"] is None) == causal
    if not causal:
        assert on.code == off.code
    for n in (6, 11):
        x2, ids2 = torch.randn(3, n, 8), torch.randint(1, 5, (3, n))
        want = model(x2, ids2)
        got = on(x=x2, ids=ids2)
        assert torch.isfinite(want).all() == torch.isfinite(got).all()
        if torch.isfinite(want).all():
            assert rel_err(got, want) <= TOL


def test_cross_attention_with_a_square_looking_mask_is_kept():
    """Query and key lengths are different symbols: ``is_causal`` cannot be proved to mean the same."""

    class Cross(nn.Module):
        def forward(self, q, kv):
            i, j = torch.arange(q.shape[2])[:, None], torch.arange(kv.shape[2])[None, :]
            return F.scaled_dot_product_attention(q, kv, kv, attn_mask=j <= i)

    q, kv = torch.randn(2, 1, 5, 4), torch.randn(2, 1, 7, 4)
    on, off = _pair(Cross(), {"q": q, "kv": kv})
    assert on.code == off.code


def test_grouped_kv_kept_when_the_dispatcher_would_fall_back_to_math(monkeypatch, llama_pair):
    """On CUDA the memory-efficient kernel has no GQA: a grouped call it would have served goes to math."""
    choice = torch._fused_sdp_choice

    def no_fused_gqa(*args, **kwargs):
        return 0 if kwargs.get("enable_gqa") else 2  # math for grouped calls, "efficient" otherwise

    off = copy.deepcopy(llama_pair[3])
    monkeypatch.setattr(torch, "_fused_sdp_choice", no_fused_gqa)
    NormalizeAttention()(off)
    monkeypatch.setattr(torch, "_fused_sdp_choice", choice)
    assert all(c["is_causal"] and not c["enable_gqa"] for c in _sdpa_calls(off))


def test_lora_on_the_normalised_graph_trains_like_on_the_unnormalised_one():
    model, ids = _llama()
    config = fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    graphs = []
    for flag in (True, False):
        gm = fxpeft.trace(copy.deepcopy(model), (), {"input_ids": ids, "use_cache": False}, normalize_attention=flag)
        graphs.append(fxpeft.rewrite(gm, config))
    on, off = graphs
    torch.manual_seed(1)
    with torch.no_grad():  # the same non-zero adapters in both, so gradients reach every LoRA factor
        for (name, p), (_, q) in zip(on.named_parameters(), off.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
                q.copy_(p)
    losses = []
    for gm in (on, off):
        gm.train()
        opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
        trace = []
        for _ in range(5):
            logits = out_tensor(gm(input_ids=ids))
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gm.parameters() if p.requires_grad)
            opt.step()
            trace.append(loss.item())
        losses.append(trace)
    assert losses[0][-1] < losses[0][0]
    assert all(abs(a - b) <= TOL * abs(b) for a, b in zip(*losses))


def test_normalised_graph_exports_again_with_dynamic_shapes(tmp_path):
    model, ids = _llama()
    gm = fxpeft.rewrite(fxpeft.trace(model, (), {"input_ids": ids, "use_cache": False}),
                        fxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fxpeft.export(gm, tmp_path / "m.pt2", (), {"input_ids": ids, "use_cache": False})
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    calls = [n for n in loaded.graph.nodes if n.op == "call_function" and n.target is SDPA]
    assert calls and all(n.kwargs.get("enable_gqa") for n in calls)
    gm.eval()
    for shape in ((3, 12), (5, 20)):
        other = torch.randint(0, 128, shape)
        with torch.no_grad():
            assert rel_err(out_tensor(loaded(input_ids=other, use_cache=False)), out_tensor(gm(input_ids=other))) <= TOL


@pytest.mark.heavy
def test_normalised_graph_under_torch_compile(llama_pair):
    model, _, on, off = llama_pair
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(on, dynamic=True)
    for shape in ((3, 12), (2, 17)):
        other = torch.randint(0, 128, shape)
        got, got_grads = _loss_and_grads(compiled, {"input_ids": other}, params)
        want, want_grads = _loss_and_grads(off, {"input_ids": other}, params)
        assert rel_err(got, want) <= 1e-5  # inductor fuses and reorders float ops: its own rounding
        assert all(rel_err(g, w) <= 1e-5 for g, w in zip(got_grads, want_grads))
