"""The spine on real architectures: trace → rewrite → train → merge → export, checked against eager PyTorch and PEFT."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from conftest import out_tensor, peft_counts, rel_err

import fxpeft
from fxpeft import zoo
from fxpeft.tags import Role, get_tag
from fxpeft.targeting import select_sites


@dataclass
class Case:
    factory: Callable[[], zoo.Example]
    symbolic: bool                     # trace without inputs (symbolic_trace) instead of torch.export
    targets: list[str]
    other: Callable[[], tuple[tuple, dict]]  # inputs of another batch size / length
    peft: bool = True                  # PEFT can adapt this model (module-based sites)


def _ids(b, s, vocab=256):
    return torch.randint(0, vocab, (b, s))


CASES = {
    "llama": Case(zoo.tiny_llama, False,
                  ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
                  lambda: ((), {"input_ids": _ids(3, 9)})),
    "gpt2": Case(zoo.tiny_gpt2, False, ["c_attn", "c_proj", "c_fc"], lambda: ((), {"input_ids": _ids(3, 9)})),
    "bert": Case(zoo.tiny_bert, False, ["query", "value", "word_embeddings"],
                 lambda: ((), {"input_ids": _ids(3, 7), "attention_mask": torch.ones(3, 7, dtype=torch.long)})),
    "cnn-export": Case(zoo.cnn, False, ["conv1", "conv2", "conv3", "fc"], lambda: ((torch.randn(5, 3, 20, 20),), {})),
    "cnn-fx": Case(zoo.cnn, True, ["conv1", "conv2", "conv3", "fc"], lambda: ((torch.randn(5, 3, 20, 20),), {})),
    "functional-fx": Case(zoo.functional_lm, True, ["emb", "w_in", "w_out", "head"],
                          lambda: ((_ids(3, 5, 64),), {}), peft=False),
    "functional-export": Case(zoo.functional_lm, False, ["emb", "w_in", "w_out", "head"],
                              lambda: ((_ids(3, 5, 64),), {}), peft=False),
}


def _trace(case: Case):
    model, args, kwargs = case.factory()
    gm = fxpeft.trace(model) if case.symbolic else fxpeft.trace(model, args, kwargs)
    gm.graph.lint()
    return model, args, kwargs, gm


def _call_kwargs(kwargs):
    # The export graph defaults its non-tensor inputs (use_cache=False) to their traced values.
    return {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", list(CASES))
def test_identity_at_init_and_dynamic_shapes(name):
    case = CASES[name]
    model, args, kwargs, gm = _trace(case)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=case.targets))
    gm.graph.lint()
    gm.eval()
    with torch.no_grad():
        assert torch.equal(out_tensor(gm(*args, **_call_kwargs(kwargs))), out_tensor(model(*args, **kwargs)))
        oargs, okw = case.other()
        want = out_tensor(model(*oargs, **okw))
        got = out_tensor(gm(*oargs, **okw))
    assert got.shape == want.shape
    assert torch.equal(got, want)
    # Every targeted site got one adapter; sites are keyed by the owning module's name.
    assert {m.site_name.rsplit(".", 1)[-1] for m in fxpeft.adapters(gm).values()} >= {
        t for t in case.targets if t not in ("head", "w_in", "w_out")}


@pytest.mark.parametrize("name", list(CASES))
def test_training_lowers_loss_and_keeps_base_bit_identical(name):
    case = CASES[name]
    model, args, kwargs, gm = _trace(case)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets))
    base = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    trainable = [p for p in gm.parameters() if p.requires_grad]
    assert trainable and base
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    gm.train()
    losses = []
    torch.manual_seed(0)
    target = torch.randn_like(out_tensor(gm(*args, **_call_kwargs(kwargs))).float())
    for _ in range(6):
        loss = (out_tensor(gm(*args, **_call_kwargs(kwargs))).float() - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in gm.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base parameter {n} changed"
            assert p.grad is None


@pytest.mark.parametrize("name", list(CASES))
def test_merge_matches_unmerged(name):
    case = CASES[name]
    model, args, kwargs, gm = _trace(case)
    n_base = {n for n, _ in gm.named_parameters()}
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets, init_lora_weights=False))
    gm.eval()
    with torch.no_grad():
        unmerged = out_tensor(gm(*args, **_call_kwargs(kwargs)))
        base_out = out_tensor(model(*args, **kwargs))
    assert rel_err(unmerged, base_out) > 1e-3  # random adapters really change the outputs
    with pytest.warns(UserWarning, match="tied") if name == "gpt2" and "wte" in case.targets else nullcontext():
        merged = fxpeft.merge(gm)
    merged.graph.lint()
    assert not fxpeft.adapters(merged)
    assert not any("fxpeft" in n.meta for n in merged.graph.nodes)
    assert {n for n, _ in merged.named_parameters()} == n_base  # exactly the base's parameters
    with torch.no_grad():
        assert rel_err(out_tensor(merged(*args, **_call_kwargs(kwargs))), unmerged) <= 1e-5
    assert fxpeft.passes.MergeAdapters()(merged).modified is False  # idempotent


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.peft and not c.symbolic])
def test_trainable_parameter_count_equals_peft(name):
    import peft

    case = CASES[name]
    model, args, kwargs, gm = _trace(case)
    cfg = dict(r=8, lora_alpha=16, target_modules=case.targets, rank_pattern={case.targets[0]: 2})
    fxpeft.rewrite(gm, fxpeft.LoraConfig(**cfg))
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, peft.LoraConfig(**cfg))


def test_ia3_identity_merge_and_count_equal_peft():
    import peft

    model, _, kwargs = zoo.tiny_llama()
    gm = fxpeft.trace(model, kwargs=kwargs)
    cfg = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    fxpeft.rewrite(gm, fxpeft.IA3Config(**cfg))
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, peft.IA3Config(**cfg))
    ids = kwargs["input_ids"]
    with torch.no_grad():
        assert torch.equal(gm(input_ids=ids).logits, model(**kwargs).logits)
        for a in fxpeft.adapters(gm).values():
            a.l.uniform_(0.5, 1.5)
        unmerged = gm(input_ids=ids).logits
    fxpeft.merge(gm)
    with torch.no_grad():
        assert rel_err(gm(input_ids=ids).logits, unmerged) <= 1e-5


def test_ia3_on_gpt2_conv1d_and_cnn_merge():
    for factory, cfg in ((zoo.tiny_gpt2, dict(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
                         (zoo.cnn, dict(target_modules=["conv1", "conv2", "fc"], feedforward_modules=["conv2"]))):
        model, args, kwargs = factory()
        gm = fxpeft.trace(model, args, kwargs)
        fxpeft.rewrite(gm, fxpeft.IA3Config(**cfg, init_ia3_weights=False))
        gm.eval()
        with torch.no_grad():
            unmerged = out_tensor(gm(*args, **_call_kwargs(kwargs)))
        fxpeft.merge(gm)
        with torch.no_grad():
            assert rel_err(out_tensor(gm(*args, **_call_kwargs(kwargs))), unmerged) <= 1e-5


def test_llama_pipeline_compile_zero_graph_breaks_and_pt2_round_trip(tmp_path):
    model, _, kwargs = zoo.tiny_llama()
    ids = kwargs["input_ids"]
    gm = fxpeft.trace(model, kwargs=kwargs)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    gm.eval()
    with torch.no_grad():
        unmerged = gm(input_ids=ids).logits
    merged = fxpeft.merge(gm)
    path = tmp_path / "model.pt2"
    fxpeft.export(merged, path, kwargs=kwargs)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]  # no temporary file left behind
    loaded = torch.export.load(str(path)).module()
    other = torch.randint(0, 256, (3, 11))
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids, use_cache=False).logits, unmerged) <= 1e-5
        assert torch.equal(loaded(input_ids=other, use_cache=False).logits, merged(input_ids=other).logits)


@pytest.mark.heavy
def test_torch_compile_zero_graph_breaks_merged_and_unmerged():
    model, _, kwargs = zoo.tiny_llama()
    ids = kwargs["input_ids"]
    gm = fxpeft.trace(model, kwargs=kwargs)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    torch._dynamo.reset()
    explain = torch._dynamo.explain(gm)(input_ids=ids)
    assert explain.graph_break_count == 0, explain.break_reasons
    # compiled training step of the unmerged graph
    gm.train()
    compiled = torch.compile(gm)
    loss = compiled(input_ids=ids).logits.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)
    gm.eval()
    merged = fxpeft.merge(gm)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(merged)(input_ids=ids)
    assert explain.graph_break_count == 0, explain.break_reasons
    with torch.no_grad():
        assert rel_err(torch.compile(merged)(input_ids=ids).logits, merged(input_ids=ids).logits) <= 1e-5


def test_dropout_follows_train_and_eval():
    model, _, kwargs = zoo.tiny_bert()
    gm = fxpeft.trace(model, kwargs=kwargs)
    drops = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.Dropout)]
    assert drops, "BERT's dropout modules are captured as call_module"
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, target_modules=["query"], lora_dropout=0.5))
    gm.train()
    with torch.no_grad():
        a, b = gm(**kwargs).last_hidden_state, gm(**kwargs).last_hidden_state
    assert not torch.equal(a, b)
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(**kwargs).last_hidden_state, model(**kwargs).last_hidden_state)


def test_graph_is_a_normal_module():
    model, _, kwargs = zoo.tiny_llama()
    gm = fxpeft.trace(model, kwargs=kwargs)
    gm.train()
    gm.eval()
    sd = gm.state_dict()
    assert set(model.state_dict()) <= set(sd) | {k for k in model.state_dict() if "rotary" in k}
    # An export graph is specialised to the dtype/device it was traced on (trace after casting the model);
    # to() on the same dtype/device works and a symbolic_trace graph converts freely.
    gm.to("cpu", torch.float32)
    assert gm(input_ids=kwargs["input_ids"]).logits.dtype == torch.float32
    cnn, args, _ = zoo.cnn()
    fx_gm = fxpeft.trace(cnn).to(torch.float64)
    assert fx_gm(args[0].double()).dtype == torch.float64
    with pytest.raises(Exception, match="use_cache"):
        gm(input_ids=kwargs["input_ids"], use_cache=True)  # baked in at trace time: the guard says so


def test_tied_embedding_merge_gets_own_copy():
    model, _, kwargs = zoo.tiny_gpt2()
    gm = fxpeft.trace(model, kwargs=kwargs)
    lm_head_before = model.lm_head.weight.detach().clone()
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, target_modules=["wte"], init_lora_weights=False))
    ids = kwargs["input_ids"]
    with torch.no_grad():
        unmerged = gm(input_ids=ids).logits
    with pytest.warns(UserWarning, match="tied"):
        fxpeft.merge(gm)
    with torch.no_grad():
        assert rel_err(gm(input_ids=ids).logits, unmerged) <= 1e-5
    heads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default]
    lm_head_w = gm.get_parameter(heads[-1].args[1].target)
    assert torch.equal(lm_head_w, lm_head_before)  # the other site is unchanged


def test_module_called_twice_is_one_site():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(torch.relu(self.proj(x)))

    torch.manual_seed(0)
    m = Twice()
    x = torch.randn(3, 8)
    for gm in (fxpeft.trace(m), fxpeft.trace(m, (x,))):
        sites = fxpeft.find_sites(gm)
        assert list(sites) == ["proj"] and len(sites["proj"].calls) == 2
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
        assert len(fxpeft.adapters(gm)) == 1
        y = gm(x)
        fxpeft.merge(gm)
        assert rel_err(gm(x), y) <= 1e-5


def test_two_adapters_on_one_site_and_partial_merge():
    model, args, _ = zoo.cnn()
    gm = fxpeft.trace(model, args)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["conv2"], init_lora_weights=False))
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=3, target_modules=["conv2", "fc"], init_lora_weights=False), adapter_name="second")
    assert fxpeft.active_adapters(gm) == ["default"]  # as PEFT's add_adapter: added, not active
    gm.eval()
    with torch.no_grad():
        base = model(*args)
        y_default = gm(*args)
        fxpeft.set_adapter(gm, ["default", "second"])
        y = gm(*args)
    assert rel_err(y_default, base) > 1e-3 and rel_err(y, y_default) > 1e-3  # each adapter really acts
    fxpeft.passes.MergeAdapters(("second",))(gm)  # merge one, keep the other
    assert sorted(a.adapter_name for a in fxpeft.adapters(gm).values()) == ["default"]
    with torch.no_grad():
        assert rel_err(gm(*args), y) <= 1e-5
    fxpeft.merge(gm)
    with torch.no_grad():
        assert rel_err(gm(*args), y) <= 1e-5


def test_targeting_rules():
    model, _, kwargs = zoo.tiny_llama()
    gm = fxpeft.trace(model, kwargs=kwargs)
    lora = fxpeft.PeftRegistry.get("lora")

    def sel(cfg):
        return [s.name for s in select_sites(gm, cfg, lora)]

    names = sel(fxpeft.LoraConfig(target_modules=["self_attn.q_proj"]))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    names = sel(fxpeft.LoraConfig(target_modules=r".*\.1\.mlp\..*_proj"))
    assert names == [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]
    allin = sel(fxpeft.LoraConfig(target_modules="all-linear"))
    assert len(allin) == 14 and "lm_head" not in allin
    excl = sel(fxpeft.LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"]))
    assert len(excl) == 12 and not any(n.endswith("o_proj") for n in excl)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                         rank_pattern={"layers.1.self_attn.v_proj": 2}, alpha_pattern={"q_proj": 4},
                                         use_rslora=True))
    ad = {a.site_name: a for a in fxpeft.adapters(gm).values()}
    assert ad["model.layers.1.self_attn.v_proj"].A.shape == (2, 64)
    assert ad["model.layers.0.self_attn.v_proj"].A.shape == (8, 64)
    assert ad["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(4 / 8 ** 0.5)
    assert ad["model.layers.1.self_attn.v_proj"].scaling == pytest.approx(16 / 2 ** 0.5)


def test_all_linear_matches_peft_selection():
    import peft

    model, _, kwargs = zoo.tiny_llama()
    gm = fxpeft.trace(model, kwargs=kwargs)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, target_modules="all-linear"))
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, peft.LoraConfig(r=4, target_modules="all-linear"))


def test_default_targets_by_model_type():
    model, _, kwargs = zoo.tiny_llama()
    gm = fxpeft.rewrite(fxpeft.trace(model, kwargs=kwargs), fxpeft.LoraConfig(r=4))
    assert sorted({a.site_name.rsplit(".", 1)[-1] for a in fxpeft.adapters(gm).values()}) == ["q_proj", "v_proj"]


def test_lean_subgraph_reads_well():
    model, _, kwargs = zoo.tiny_llama(layers=1)
    gm = fxpeft.trace(model, kwargs=kwargs)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"]))
    roles = [get_tag(n).role for n in gm.graph.nodes if get_tag(n) is not None]
    assert Role.DROPOUT not in roles  # p = 0: no dropout node
    # the scaling is a run-time buffer (0 while the adapter is off): one read and one multiply, even at scaling 1
    assert roles.count(Role.SCALING) == 1 and roles.count(Role.SCALE) == 1
    assert roles.count(Role.DOWN) == roles.count(Role.UP) == roles.count(Role.OUT) == 1
    assert len(roles) == 7  # A, B, scale buffer reads; down, scale, up, out
    assert "model_layers_0_self_attn_q_proj_up" in gm.code and "model_layers_0_self_attn_q_proj_out" in gm.code


@pytest.mark.parametrize("keep_base_dtype", [False, True], ids=["fp32-adapters", "keep-base-dtype"])
def test_bf16_merge_computes_delta_in_fp32(keep_base_dtype):
    model, _, kwargs = zoo.tiny_llama()
    model.to(torch.bfloat16)
    gm = fxpeft.trace(model, kwargs=kwargs)
    r, alpha = 4, 8
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "down_proj"],
                                         init_lora_weights=False, keep_base_dtype=keep_base_dtype))
    ads = fxpeft.adapters(gm)
    adapter_params = {id(p) for a in ads.values() for p in a.parameters()}
    assert all(p.dtype == torch.bfloat16 for p in gm.parameters() if id(p) not in adapter_params)
    # PEFT's autocast_adapter_dtype: fp32 adapters on a bf16 base, with casts in the graph; or the base dtype
    want_dtype = torch.bfloat16 if keep_base_dtype else torch.float32
    assert adapter_params and all(p.dtype == want_dtype for a in ads.values() for p in a.parameters())
    casts = [n for n in gm.graph.nodes if get_tag(n) is not None and get_tag(n).role is Role.CAST]
    assert bool(casts) != keep_base_dtype
    site = fxpeft.find_sites(gm)["model.layers.0.mlp.down_proj"]
    adapter = next(a for a in ads.values() if a.site_name == site.name)
    w = gm.get_parameter(site.weight).detach().clone()
    # the fp32 delta B @ A * alpha / r, computed here, with one rounding to bf16 at the end
    want = (w.float() + (adapter.B.detach().float() @ adapter.A.detach().float()) * (alpha / r)).to(torch.bfloat16)
    assert not torch.equal(want, w)
    ids = kwargs["input_ids"]
    with torch.no_grad():
        unmerged = gm(input_ids=ids).logits.float()
    assert gm(input_ids=ids).logits.dtype == torch.bfloat16  # the casts give the base's dtype back
    fxpeft.merge(gm)
    assert not fxpeft.adapters(gm)
    assert gm.get_parameter(site.weight).dtype == torch.bfloat16
    torch.testing.assert_close(gm.get_parameter(site.weight), want, rtol=0, atol=0)
    with torch.no_grad():
        assert rel_err(gm(input_ids=ids).logits.float(), unmerged) <= 2e-2  # bf16 rounding of the weights


def test_peft_config_objects_are_accepted_and_batch_one_warns():
    import peft

    model, _, kwargs = zoo.tiny_llama()
    gm = fxpeft.trace(model, kwargs=kwargs)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    fxpeft.rewrite(gm, cfg)
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, cfg)
    dora = peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)  # DoRA: the magnitudes count too
    assert fxpeft.get_nb_trainable_parameters(fxpeft.rewrite(fxpeft.trace(model, kwargs=kwargs), dora)) == \
        peft_counts(model, dora)
    with pytest.warns(UserWarning, match="size-1 dims"):
        fxpeft.trace(model, kwargs={"input_ids": kwargs["input_ids"][:1], "use_cache": False})


# ------------------------------------------------------------------------------------------- regressions


class KeywordCalls(torch.nn.Module):
    """Calls F.linear / F.conv2d with keyword arguments only: a symbolic graph keeps them as node kwargs."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 6) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(8) * 0.1)
        self.k = torch.nn.Parameter(torch.randn(5, 3, 3, 3) * 0.2)

    def forward(self, x, img):
        return (torch.nn.functional.linear(input=x, weight=self.w, bias=self.b),
                torch.nn.functional.conv2d(input=img, weight=self.k, padding=1))


def test_keyword_argument_sites_in_a_symbolic_graph():
    F = torch.nn.functional
    torch.manual_seed(0)
    model = KeywordCalls()
    x, img = torch.randn(4, 6), torch.randn(2, 3, 7, 7)
    want = model(x, img)
    gm = fxpeft.trace(model)
    sites = fxpeft.find_sites(gm)
    assert {n: s.kind for n, s in sites.items()} == {"w": "linear", "k": "conv"}
    assert all(c.node.kwargs and c.input_pos == "input" for s in sites.values() for c in s.calls)

    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["w", "k"]))
    gm.graph.lint()
    got = gm(x, img)
    assert len(fxpeft.adapters(gm)) == 2
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # zero-initialised B: exactly the base

    gm = fxpeft.rewrite(fxpeft.trace(model), fxpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["w", "k"],
                                                                init_lora_weights=False))
    ad = {a.site_name: a for a in fxpeft.adapters(gm).values()}
    with torch.no_grad():
        unmerged = gm(x, img)
        eager = (F.linear(x, model.w, model.b) + F.linear(F.linear(x, ad["w"].A), ad["w"].B) * 2.0,
                 F.conv2d(img, model.k, padding=1) + F.conv2d(F.conv2d(img, ad["k"].A, padding=1), ad["k"].B) * 2.0)
    for u, e, base in zip(unmerged, eager, want):
        assert rel_err(u, base) > 1e-3
        assert rel_err(u, e) <= 1e-6
    fxpeft.merge(gm)
    gm.graph.lint()
    assert not fxpeft.adapters(gm)
    with torch.no_grad():
        for m, u in zip(gm(x, img), unmerged):
            assert rel_err(m, u) <= 1e-5


def _smollm2_style():
    """A tiny LlamaForCausalLM with tied input/output embeddings, as SmolLM2 ships."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), {"input_ids": torch.randint(0, 128, (2, 10)), "use_cache": False}


def _token_embedding_weights(gm, shape) -> list[torch.Tensor]:
    """The weights the graph's token embeddings read (GPT-2's position embedding has another shape)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.embedding.default]
    return [w for n in nodes if (w := gm.get_parameter(n.args[0].target)).shape == shape]


@pytest.mark.parametrize("name", ["smollm2", "gpt2"])
def test_lora_on_tied_lm_head_merges_and_exports(name, tmp_path):
    if name == "smollm2":
        model, kwargs = _smollm2_style()
    else:
        model, _, kwargs = zoo.tiny_gpt2(layers=1)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    emb_before = model.get_input_embeddings().weight.detach().clone()
    ids = kwargs["input_ids"]
    gm = fxpeft.trace(model, kwargs=kwargs)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False))
    assert [a.site_name for a in fxpeft.adapters(gm).values()] == ["lm_head"]
    gm.eval()
    with torch.no_grad():
        unmerged = gm(input_ids=ids).logits
        assert rel_err(unmerged, model(**kwargs).logits) > 1e-3
    with pytest.warns(UserWarning, match="tied"):
        fxpeft.merge(gm)
    (w,) = _token_embedding_weights(gm, emb_before.shape)
    assert torch.equal(w, emb_before)  # the graph's input embedding
    assert torch.equal(model.get_input_embeddings().weight, emb_before)  # and the model's, which shares it
    with torch.no_grad():
        assert rel_err(gm(input_ids=ids).logits, unmerged) <= 1e-5

    path = tmp_path / "merged.pt2"
    fxpeft.export(gm, path, kwargs=kwargs)
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        assert rel_err(loaded(**kwargs).logits, unmerged) <= 1e-5
    (w,) = _token_embedding_weights(loaded, emb_before.shape)
    assert torch.equal(w, emb_before)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
@pytest.mark.parametrize("symbolic", [False, True], ids=["export", "fx"])
def test_all_linear_on_plain_modules_adapts_every_linear(name, symbolic):
    import peft

    if name == "cnn":
        model, args, _ = zoo.cnn()
    else:
        torch.manual_seed(0)
        model, args = torch.nn.Sequential(torch.nn.Linear(6, 3)).eval(), (torch.randn(4, 6),)
    gm = fxpeft.trace(model) if symbolic else fxpeft.trace(model, args)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules="all-linear"))
    got = {a.site_name for a in fxpeft.adapters(gm).values()}
    assert got == {"cnn": {"fc"}, "mlp": {"0"}}[name]  # the output linear too: these are no transformers models
    cfg = peft.LoraConfig(r=2, target_modules="all-linear")
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    assert set(pm.targeted_module_names) == got
    assert fxpeft.get_nb_trainable_parameters(gm) == pm.get_nb_trainable_parameters()
    with torch.no_grad():
        assert torch.equal(gm(*args), model(*args))


@pytest.mark.parametrize("symbolic", [False, True], ids=["export", "fx"])
def test_stacked_adapters_merge_or_remove_the_outer_one_keeps_the_inner(symbolic):
    F = torch.nn.functional
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4)).eval()
    x = torch.randn(3, 6)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    gm = fxpeft.trace(model) if symbolic else fxpeft.trace(model, (x,))
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False), "a")
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=3, lora_alpha=3, target_modules=["0"], init_lora_weights=False), "b")
    fxpeft.set_adapter(gm, ["a", "b"])
    ad = {a.adapter_name: a for a in fxpeft.adapters(gm).values()}
    with torch.no_grad():
        da = ad["a"].B @ ad["a"].A * 2.0
        db = ad["b"].B @ ad["b"].A * 1.0
        assert rel_err(gm(x), F.linear(x, w0 + da + db, b0)) <= 1e-6
        fxpeft.passes.MergeAdapters(("a",))(gm)  # the adapter inserted first: "b"'s OUT node sits between
        assert [a.adapter_name for a in fxpeft.adapters(gm).values()] == ["b"]
        assert rel_err(gm(x), F.linear(x, w0 + da + db, b0)) <= 1e-6
        fxpeft.passes.RemoveAdapters(("b",))(gm)
        assert not fxpeft.adapters(gm)
        assert rel_err(gm(x), F.linear(x, w0 + da, b0)) <= 1e-6
    gm2 = fxpeft.trace(model) if symbolic else fxpeft.trace(model, (x,))
    code = gm2.code
    fxpeft.rewrite(gm2, fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), "a")
    fxpeft.rewrite(gm2, fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), "b")
    fxpeft.passes.RemoveAdapters(("a",))(gm2)
    fxpeft.passes.RemoveAdapters(("b",))(gm2)
    assert gm2.code == code  # the exact inverse, in either order
