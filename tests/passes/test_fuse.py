"""Sibling LoRA fusion (passes/fuse.py) and the lean LoRA dropout: equivalence, tags, merge, idempotence."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fxpeft.passes import FuseLowRankSiblings, UnfuseLowRankSiblings
from fxpeft.passes.inject import adapter_nodes
from torch import nn

import fxpeft
from fxpeft.methods.lora import LoraDropout
from fxpeft.sites import find_sites
from fxpeft.tags import Role, get_tag
from fxpeft.zoo import tiny_llama


class QKV(nn.Module):
    """Three projections of one input (one group), one of another (no group), summed."""

    def __init__(self, d: int = 12):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d // 2, bias=False), nn.Linear(d, d // 2)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        h = torch.cat([self.q(x), self.k(x) * self.v(x)], -1)[..., : x.shape[-1]]
        return self.o(torch.relu(h))


def _llama(layers: int = 1):
    model, _, kw = tiny_llama(layers=layers, hidden=32, vocab=64, batch=2, seq=8)
    return model, kw


def _pair(gm_base, config, **fuse_kw):
    """(unfused, fused) rewrites of copies of one traced graph, with identical adapter weights."""
    unfused = fxpeft.rewrite(copy.deepcopy(gm_base), config, fuse=False)
    fused = FuseLowRankSiblings(**fuse_kw)(copy.deepcopy(unfused)).graph_module
    return unfused, fused


def _role(n):
    tag = get_tag(n)
    return None if tag is None else tag.role


def _lora_matmuls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if _role(n) is Role.DOWN)


def _randomize(gm, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def llama_graph():
    model, kw = _llama()
    return fxpeft.trace(model, (), kw), kw


ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("init", [True, False])
def test_fused_equals_unfused_outputs_and_grads(llama_graph, init):
    base, kw = llama_graph
    cfg = fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL7, init_lora_weights=init)
    unfused, fused = _pair(base, cfg)
    fused.load_state_dict(unfused.state_dict())
    # one matmul per group: q/k/v, gate/up, o, down
    assert _lora_matmuls(unfused) == 7 and _lora_matmuls(fused) == 4
    for gm in (unfused, fused):
        gm.train()
    outs, grads = [], []
    for gm in (unfused, fused):
        out = gm(**kw).logits
        out.float().pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 14  # per-site A and B
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_fusion_keeps_per_site_parameters_and_files(llama_graph, tmp_path):
    base, kw = llama_graph
    cfg = fxpeft.LoraConfig(r=4, target_modules=ALL7, init_lora_weights=False)
    unfused, fused = _pair(base, cfg)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    assert {n for n, p in fused.named_parameters() if p.requires_grad} == {
        n for n, p in unfused.named_parameters() if p.requires_grad}
    fxpeft.save_adapter(fused, tmp_path / "f")
    fxpeft.save_adapter(unfused, tmp_path / "u")
    for name in ("adapter_config.json",):
        assert (tmp_path / "f" / name).read_text() == (tmp_path / "u" / name).read_text()
    loaded = fxpeft.load_adapter(copy.deepcopy(base), tmp_path / "f")  # load rewrites with fusion on
    assert _lora_matmuls(loaded) == 4
    loaded.eval(), unfused.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw).logits, unfused(**kw).logits)


def test_fused_tags(llama_graph):
    base, _ = llama_graph
    _, fused = _pair(base, fxpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=ALL7))
    shared = [n for n in fused.graph.nodes if get_tag(n) is not None and get_tag(n).fused]
    # the down side is shared; each site keeps its own run-time scale, B and OUT node
    assert {get_tag(n).role for n in shared} == {Role.DOWN_CAT, Role.DROPOUT, Role.DOWN, Role.DOWN_SPLIT}
    groups = {get_tag(n).fused for n in shared}
    assert {tuple(m.rsplit(".", 2)[-2] for m in g) for g in groups} == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
    for n in shared:  # shared nodes belong to the first site of their group
        tag = get_tag(n)
        assert tag.module == tag.fused[0] and tag.method == "lora" and tag.adapter == "default"
    parts = [n for n in fused.graph.nodes if _role(n) is Role.DOWN_PART]
    assert len(parts) == 5 and all(not get_tag(n).fused for n in parts)
    scales = [n for n in fused.graph.nodes if _role(n) is Role.SCALE]
    assert len(scales) == 7 and all(not get_tag(n).fused for n in scales)
    assert sum(1 for n in fused.graph.nodes if n.op == "call_module" and "lora" in n.target) == 4  # 4 dropouts
    assert set(adapter_nodes(fused)) == {m for m in dict(fused.named_modules()) if m.endswith("lora_default")}
    fused.graph.lint()


def test_idempotent_and_unfuse(llama_graph):
    base, kw = llama_graph
    unfused, fused = _pair(base, fxpeft.LoraConfig(r=4, lora_dropout=0.1, target_modules=ALL7, init_lora_weights=False))
    code = fused.code
    res = FuseLowRankSiblings()(fused)
    assert not res.modified and fused.code == code
    assert UnfuseLowRankSiblings()(fused).modified
    assert not UnfuseLowRankSiblings()(fused).modified
    assert _lora_matmuls(fused) == 7
    assert not any(get_tag(n) is not None and get_tag(n).fused for n in fused.graph.nodes)
    fused.graph.lint()
    for gm in (fused, unfused):
        gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(**kw).logits, unfused(**kw).logits)
    assert FuseLowRankSiblings()(fused).modified and _lora_matmuls(fused) == 4


def test_merge_fused_graph():
    model, kw = _llama()
    base = fxpeft.trace(copy.deepcopy(model), (), kw)
    cfg = fxpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=ALL7, init_lora_weights=False)
    unfused, fused = _pair(base, cfg)
    assert any(_role(n) is Role.DOWN_CAT for n in fused.graph.nodes)
    for gm in (unfused, fused):
        gm.eval()
    with torch.no_grad():
        before = fused(**kw).logits
        torch.testing.assert_close(before, unfused(**kw).logits)
        merged_f = fxpeft.merge(fused)
        merged_u = fxpeft.merge(unfused)
        torch.testing.assert_close(merged_f(**kw).logits, before, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged_f(**kw).logits, merged_u(**kw).logits, rtol=1e-5, atol=1e-6)
    assert not any(get_tag(n) is not None or "fxpeft" in n.meta for n in merged_f.graph.nodes)
    assert not fxpeft.api.adapters(merged_f)
    assert merged_f.code == merged_u.code
    assert set(find_sites(merged_f)) == set(find_sites(base))


def test_per_site_ranks_and_scales():
    model, kw = _llama()
    base = fxpeft.trace(model, (), kw)
    cfg = fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL7, init_lora_weights=False,
                            rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3, "up_proj": 16})
    unfused, fused = _pair(base, cfg)
    assert _lora_matmuls(fused) == 4
    scales = [n for n in fused.graph.nodes if _role(n) is Role.SCALE]
    assert len(scales) == 7 and all(not get_tag(n).fused for n in scales)  # per-site scales stay per site
    for gm in (unfused, fused):
        gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(**kw).logits, unfused(**kw).logits)


def test_two_adapters_fuse_and_merge_separately():
    model, kw = _llama()
    gm = fxpeft.trace(model, (), kw)
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=ALL7, init_lora_weights=False), "a")
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=3, target_modules=["q_proj", "k_proj"], init_lora_weights=False), "b",
                        fuse=False)
    assert _lora_matmuls(gm) == 4 + 2  # "a" fused, "b" left as asked
    assert FuseLowRankSiblings(adapter_names=("b",))(gm).modified and _lora_matmuls(gm) == 5
    fxpeft.set_adapter(gm, ["a", "b"])
    gm.eval()
    with torch.no_grad():
        before = gm(**kw).logits
        fxpeft.passes.MergeAdapters(("a",))(gm)  # merge "a", keep "b" (fxpeft.merge would unload "b" too)
        torch.testing.assert_close(gm(**kw).logits, before, rtol=1e-4, atol=1e-5)
    assert {get_tag(n).adapter for ns in adapter_nodes(gm).values() for n in ns} == {"b"} and _lora_matmuls(gm) == 1
    gm.graph.lint()


def test_fx_dialect_and_train_mode_dropout_shares_one_mask():
    """Fused siblings see one dropout mask (the first site's); unfused, each site draws its own."""
    torch.manual_seed(0)
    model = QKV()
    x = torch.randn(5, 12)
    cfg = fxpeft.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.4, target_modules=["q", "k", "v", "o"],
                            init_lora_weights=False)
    unfused, fused = _pair(fxpeft.trace(model), cfg)
    assert fxpeft.sites.graph_dialect(fused) == "fx" and _lora_matmuls(fused) == 2
    fused.train(), unfused.train()

    def site_outputs(gm):
        out = {}
        for n in gm.graph.nodes:
            if _role(n) is Role.OUT:
                out[get_tag(n).site] = n
        return out

    def run(gm):
        # record every site's output (base + LoRA) on one forward
        recorded = {}
        interp = torch.fx.Interpreter(gm)
        orig = interp.run_node

        def run_node(n):
            v = orig(n)
            if n in site_outputs(gm).values():
                recorded[get_tag(n).site] = v
            return v

        interp.run_node = run_node
        interp.run(x)
        return recorded

    torch.manual_seed(1)
    got = run(fused)
    torch.manual_seed(1)
    xd = LoraDropout(0.4).train()(x)  # the one mask the group draws
    for name in ("q", "k", "v"):
        lin, ad = getattr(model, name), getattr(fused, name).lora_default
        assert ad.scaling == 2.0  # lora_alpha / r
        want = lin(x) + F.linear(F.linear(xd, ad.A) * 2.0, ad.B)
        torch.testing.assert_close(got[name], want)
    torch.manual_seed(1)
    per_site = run(unfused)
    torch.testing.assert_close(per_site["q"], got["q"])  # the first site draws first in both
    assert not torch.allclose(per_site["k"], got["k"])  # k draws its own mask when unfused


def test_lora_dropout():
    d = LoraDropout(0.1)
    x = torch.ones(200_000)
    torch.manual_seed(3)
    a = d(x)
    torch.manual_seed(3)
    assert torch.equal(a, d(x))  # follows torch.manual_seed
    assert abs((a == 0).float().mean().item() - 0.1) < 0.005
    assert abs(a.mean().item() - 1.0) < 0.01  # unbiased
    assert d(torch.ones(4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert torch.equal(d.eval()(x), x)
    d.train()
    xg = torch.randn(64, requires_grad=True)
    y = d(xg)
    y.sum().backward()
    torch.testing.assert_close(xg.grad, (y != 0).float() / (1 - 6554 / 65536))
    assert isinstance(d, nn.Dropout) and d.p == 0.1


def test_lora_dropout_saves_a_bool_mask_for_backward():
    d, x = LoraDropout(0.25).train(), torch.randn(4, 1000, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(5)
        y = d(x)
    assert [t.dtype for t in saved] == [torch.bool] and saved[0].shape == x.shape  # 1 byte an element, not 4
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    mask = torch.where(saved[0], 1 / (1 - 16384 / 65536), 0.0)
    assert torch.equal(y, x * mask) and torch.equal(grad, g * mask)  # the values autograd's own mul gives


def test_lora_dropout_under_torch_func_transforms():
    d, x = LoraDropout(0.5).train(), torch.randn(6, 8)
    y = torch.func.vmap(d, randomness="different")(x)  # each row its own mask
    assert y.shape == x.shape and not torch.equal(y[0] == 0, y[1] == 0)
    g = torch.func.grad(lambda t: d(t).sum())(x)  # nn.Dropout's gradient: 0 or 1 / (1 - p)
    assert set(g.unique().tolist()) <= {0.0, 2.0}


def test_lora_dropout_forward_mode_tangent_is_the_masked_tangent():
    import torch.autograd.forward_ad as fwAD

    d, x, t = LoraDropout(0.3).train(), torch.randn(4, 8), torch.randn(4, 8)
    with fwAD.dual_level():
        y, tangent = fwAD.unpack_dual(d(fwAD.make_dual(x, t)))
    scale = torch.tensor(65536 / (65536 - round(0.3 * 65536)))
    assert torch.equal(tangent, torch.where(y != 0, t * scale, 0.0))


def test_rewrite_fuses_by_default_and_switch(llama_graph):
    base, _ = llama_graph
    cfg = fxpeft.LoraConfig(r=2, target_modules=ALL7)
    assert _lora_matmuls(fxpeft.rewrite(copy.deepcopy(base), cfg)) == 4
    assert _lora_matmuls(fxpeft.rewrite(copy.deepcopy(base), cfg, fuse=False)) == 7
    # IA3 has nothing to fuse; rewrite still works
    ia3 = fxpeft.rewrite(copy.deepcopy(base), fxpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                               feedforward_modules=["down_proj"]))
    assert not FuseLowRankSiblings()(ia3).modified


def test_fused_nodes_keep_module_stack(llama_graph):
    base, _ = llama_graph
    unfused, fused = _pair(base, fxpeft.LoraConfig(r=2, lora_dropout=0.1, target_modules=ALL7))
    # an export graph's base nodes carry their module stack; every inserted compute node must carry its site's
    for gm in (unfused, fused, UnfuseLowRankSiblings()(copy.deepcopy(fused)).graph_module):
        checked = 0
        for n in gm.graph.nodes:
            tag = get_tag(n)
            if tag is not None and n.op != "get_attr":
                stack = n.meta.get("nn_module_stack")
                assert stack and list(stack.values())[-1][0] == tag.site, (n.name, stack)
                checked += 1
        assert checked >= 7 * 4  # at least down/scale/up/out per site
