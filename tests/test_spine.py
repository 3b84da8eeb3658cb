"""The spine on real architectures: trace → rewrite → train → merge → export, checked against eager PyTorch and PEFT."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from conftest import out_tensor, peft_counts, rel_err

import fxpeft
from fxpeft import zoo


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
    gm.eval()
    with torch.no_grad():
        y = gm(*args)
    fxpeft.merge(gm, adapter_names=["second"])
    assert sorted(a.adapter_name for a in fxpeft.adapters(gm).values()) == ["default"]
    with torch.no_grad():
        assert rel_err(gm(*args), y) <= 1e-5
    fxpeft.merge(gm)
    with torch.no_grad():
        assert rel_err(gm(*args), y) <= 1e-5


def test_targeting_rules():
    model, _, kwargs = zoo.tiny_llama()
    gm = fxpeft.trace(model, kwargs=kwargs)
    sel = fxpeft.passes.inject.select_sites
    names = [s.name for s in sel(gm, fxpeft.LoraConfig(target_modules=["self_attn.q_proj"]), "lora")]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    names = [s.name for s in sel(gm, fxpeft.LoraConfig(target_modules=r".*\.1\.mlp\..*_proj"), "lora")]
    assert names == [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]
    allin = [s.name for s in sel(gm, fxpeft.LoraConfig(target_modules="all-linear"), "lora")]
    assert len(allin) == 14 and "lm_head" not in allin
    excl = [s.name for s in sel(gm, fxpeft.LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"]), "lora")]
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
    roles = [n.meta["fxpeft"]["role"] for n in gm.graph.nodes if "fxpeft" in n.meta]
    assert "dropout" not in roles and "scale" not in roles  # p = 0 and scaling = 1: no nodes for them
    assert "model_layers_0_self_attn_q_proj_lora_B" in gm.code


def test_bf16_merge_computes_delta_in_fp32():
    model, _, kwargs = zoo.tiny_llama()
    model.to(torch.bfloat16)
    gm = fxpeft.trace(model, kwargs=kwargs)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    assert all(p.dtype == torch.bfloat16 for p in gm.parameters())
    site = fxpeft.find_sites(gm)["model.layers.0.mlp.down_proj"]
    adapter = next(a for a in fxpeft.adapters(gm).values() if a.site_name == site.name)
    w = gm.get_parameter(site.weight)
    want = (w.float() + adapter.delta_weight(site)).to(torch.bfloat16)  # fp32 delta, one rounding at the end
    ids = kwargs["input_ids"]
    with torch.no_grad():
        unmerged = gm(input_ids=ids).logits.float()
    fxpeft.merge(gm)
    assert gm.get_parameter(site.weight).dtype == torch.bfloat16
    assert torch.equal(gm.get_parameter(site.weight), want)
    with torch.no_grad():
        assert rel_err(gm(input_ids=ids).logits.float(), unmerged) <= 2e-2  # bf16 rounding of the weights


def test_peft_config_objects_are_accepted_and_batch_one_warns():
    import peft

    model, _, kwargs = zoo.tiny_llama()
    gm = fxpeft.trace(model, kwargs=kwargs)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    fxpeft.rewrite(gm, cfg)
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, cfg)
    with pytest.raises(fxpeft.FxPeftError, match="DoRA"):
        fxpeft.rewrite(fxpeft.trace(model, kwargs=kwargs), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.warns(UserWarning, match="size-1 dims"):
        fxpeft.trace(model, kwargs={"input_ids": kwargs["input_ids"][:1], "use_cache": False})
