"""A mixed batch (one adapter per row), checked against PEFT's ``adapter_names=`` forward, against one-adapter
forwards of the same graph on HF Llama / GPT-2, a CNN and a functional model, under torch.compile, through
a ``.pt2``, and in training (each row's gradient reaches its own adapter only)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch._dynamo.testing
from conftest import out_tensor, rel_err

import fxpeft
from fxpeft import zoo

ROWS = ["a", "__base__", "b", "a"]


def _adapted(example, targets, trace_inputs=True, dropout=0.0):
    model, args, kwargs = example
    gm = fxpeft.trace(copy.deepcopy(model), args, kwargs) if trace_inputs else fxpeft.trace(copy.deepcopy(model))
    for i, name in enumerate(("a", "b")):  # different ranks: the mixed graph pads the smaller one
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2 + 2 * i, lora_alpha=4, target_modules=targets[i], init_lora_weights=False,
                                             lora_dropout=dropout), name)
    return gm.eval(), args, kwargs


def _per_adapter(gm, args, kwargs) -> dict[str, torch.Tensor]:
    """Each adapter's (and the base's) outputs from the one-adapter graph."""
    outs = {}
    for name in fxpeft.adapter_names(gm):
        fxpeft.set_adapter(gm, name)
        outs[name] = out_tensor(gm(*args, **kwargs)).detach()
    with fxpeft.disable_adapters(gm):
        outs["__base__"] = out_tensor(gm(*args, **kwargs)).detach()
    return outs


CASES = {
    "llama": (lambda: zoo.tiny_llama(layers=1, batch=4), (["q_proj", "v_proj", "embed_tokens"], ["q_proj", "down_proj"])),
    "gpt2": (zoo.tiny_gpt2, (["c_attn", "wte"], ["c_attn", "c_fc"])),  # Conv1D: addmm on [B*T, in] rows
    "cnn": (zoo.cnn, (["conv1", "conv2", "fc"], ["conv2", "conv3"])),  # conv: a grouped conv per row
    "functional": (zoo.functional_lm, (["emb", "blocks.0.w_in"], ["blocks.0.w_in", "blocks.1.w_out", "head"])),
}


# transformers 5 models trace with torch.export only; the others in both dialects
@pytest.mark.parametrize("case,trace_inputs", [(c, True) for c in CASES] + [("cnn", False), ("functional", False)])
def test_each_row_gets_its_own_adapter(case, trace_inputs):
    make, targets = CASES[case]
    gm, args, kwargs = _adapted(make(), targets, trace_inputs)
    ref = _per_adapter(gm, args, kwargs)
    batch = ref["a"].shape[0]
    rows = (ROWS * batch)[:batch]
    code = gm.code
    out = out_tensor(gm(*args, adapter_names=rows, **kwargs))
    for i, name in enumerate(rows):
        assert rel_err(out[i], ref[name][i]) <= 1e-6, (i, name)
    assert gm.code == code  # the one-adapter graph is untouched
    mixed = fxpeft.mixed_batch(gm)
    mixed.graph.lint()
    assert fxpeft.mixed_batch(gm) is mixed  # built once per graph edit


def test_same_outputs_as_peft_adapter_names():
    peft = pytest.importorskip("peft")
    model, args, kwargs = zoo.tiny_llama(layers=1, batch=4)
    cfgs = {"a": dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]),
            "b": dict(r=6, target_modules=["q_proj", "down_proj"], lora_dropout=0.1)}
    gm, pm = fxpeft.trace(copy.deepcopy(model), args, kwargs), None
    for name, cfg in cfgs.items():
        fxpeft.rewrite(gm, fxpeft.LoraConfig(lora_alpha=8, init_lora_weights=False, **cfg), name)
        pc = peft.LoraConfig(lora_alpha=8, init_lora_weights=False, **cfg)
        pm = peft.get_peft_model(copy.deepcopy(model), pc, adapter_name=name) if pm is None else pm
        if name not in pm.peft_config:
            pm.add_adapter(name, pc)
    with torch.no_grad():
        for m in fxpeft.adapters(gm).values():
            layer = pm.base_model.model.get_submodule(m.site_name)
            if m.kind == "embedding":
                layer.lora_embedding_A[m.adapter_name].copy_(m.A)
                layer.lora_embedding_B[m.adapter_name].copy_(m.B)
            else:
                layer.lora_A[m.adapter_name].weight.copy_(m.A)
                layer.lora_B[m.adapter_name].weight.copy_(m.B)
    gm.eval(), pm.eval()
    for rows in (ROWS, ["b"] * 4, ["__base__"] * 4):
        ours = out_tensor(gm(*args, adapter_names=rows, **kwargs))
        theirs = out_tensor(pm(*args, adapter_names=rows, **kwargs))
        assert rel_err(ours, theirs) <= 1e-5, rows


def test_compiled_mixed_graph_does_not_recompile_for_other_rows():
    gm, args, kwargs = _adapted(zoo.tiny_llama(layers=1, batch=4), (["q_proj"], ["v_proj"]))
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(fxpeft.mixed_batch(gm), backend=counter)
    for rows in (ROWS, ["b", "b", "a", "__base__"], ["a"] * 4):
        out = compiled(*args, adapter_index=fxpeft.adapter_index(gm, rows), **kwargs)
        assert rel_err(out_tensor(out), out_tensor(gm(*args, adapter_names=rows, **kwargs))) <= 1e-6
    assert counter.frame_count == 1


def test_compiled_graph_takes_adapter_names_without_recompiling():
    gm, args, kwargs = _adapted(zoo.functional_lm(), (["blocks.0.w_in"], ["blocks.0.w_in", "head"]))
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(gm, backend=counter)
    for rows in (["a", "b"], ["b", "__base__"], ["a", "a"]):
        assert rel_err(compiled(*args, adapter_names=rows, **kwargs), gm(*args, adapter_names=rows, **kwargs)) <= 1e-6
    assert counter.frame_count == 1 and counter.op_count > 0  # the names become an index outside the compiled code


def test_export_takes_the_row_index_as_an_input(tmp_path):
    gm, args, kwargs = _adapted(zoo.tiny_llama(layers=1, batch=4), (["q_proj"], ["v_proj", "o_proj"]))
    path = tmp_path / "mixed.pt2"
    fxpeft.export_mixed_batch(gm, path, args, kwargs)
    table = json.loads((tmp_path / "mixed.pt2.adapters.json").read_text())
    assert table == ["__base__", "a", "b"]
    loaded = torch.export.load(path).module()
    ids = torch.randint(0, 256, (3, 9))  # another batch and length: both dims stay dynamic
    rows = ["b", "__base__", "a"]
    index = torch.tensor([table.index(r) for r in rows])
    out = loaded(input_ids=ids, use_cache=False, adapter_index=index)
    assert rel_err(out_tensor(out), out_tensor(gm(input_ids=ids, adapter_names=rows))) <= 1e-6


def test_each_rows_gradient_reaches_only_its_adapter():
    gm, args, kwargs = _adapted(zoo.tiny_llama(layers=1, batch=4), (["q_proj", "v_proj"], ["q_proj", "down_proj"]))
    fxpeft.set_adapter(gm, ["a", "b"])  # both trainable
    params = dict((n, p) for n, p in gm.named_parameters() if p.requires_grad)
    out_tensor(gm(*args, adapter_names=ROWS, **kwargs)).square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in params.items()}
    ids = kwargs["input_ids"]
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for name in ("a", "b"):  # the same rows, one adapter at a time
        rows = [i for i, r in enumerate(ROWS) if r == name]
        fxpeft.set_adapter(gm, ["a", "b"])
        gm.zero_grad()
        fxpeft.set_adapter(gm, name)
        for p in params.values():
            p.requires_grad_(True)
        out_tensor(gm(input_ids=ids[rows], use_cache=False)).square().sum().backward()
        for n, p in params.items():
            if p.grad is not None:
                expected[n] += p.grad
    for n in params:
        assert rel_err(mixed[n], expected[n]) <= 1e-5, n
    assert all(mixed[n].abs().sum() > 0 for n in params)


def test_training_a_mixed_batch_lowers_the_loss():
    gm, args, kwargs = _adapted(zoo.tiny_llama(layers=1, batch=4), (["q_proj", "v_proj"], ["q_proj"]), dropout=0.1)
    gm.train()
    fxpeft.set_adapter(gm, ["a", "b"])
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    ids = kwargs["input_ids"]
    losses = []
    for _ in range(5):
        logits = out_tensor(gm(input_ids=ids, use_cache=False, adapter_names=ROWS))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_dropout_follows_train_and_eval():
    gm, args, kwargs = _adapted(zoo.tiny_llama(layers=1, batch=4), (["q_proj"], ["q_proj"]), dropout=0.5)
    gm.train()
    first = out_tensor(gm(*args, adapter_names=["a"] * 4, **kwargs))
    assert not torch.equal(first, out_tensor(gm(*args, adapter_names=["a"] * 4, **kwargs)))  # a new mask each time
    gm.eval()
    ref = _per_adapter(gm, args, kwargs)
    assert rel_err(out_tensor(gm(*args, adapter_names=["a"] * 4, **kwargs)), ref["a"]) <= 1e-6


def test_rebuilt_after_an_edit_and_after_hotswap_style_changes():
    gm, args, kwargs = _adapted(zoo.tiny_llama(layers=1, batch=4), (["q_proj"], ["v_proj"]))
    first = fxpeft.mixed_batch(gm)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), "c")
    second = fxpeft.mixed_batch(gm)
    assert second is not first
    assert fxpeft.adapter_index(gm, ["c", "a"]).tolist() == [3, 1]
    fxpeft.set_adapter(gm, "c")
    ref = out_tensor(gm(*args, **kwargs))
    assert rel_err(out_tensor(gm(*args, adapter_names=["c"] * 4, **kwargs)), ref) <= 1e-6


def test_bad_names_and_states_raise_typed_errors():
    gm, args, kwargs = _adapted(zoo.tiny_llama(layers=1, batch=4), (["q_proj"], ["v_proj"]))
    with pytest.raises(fxpeft.ConfigError, match="'nope'.*\\['a', 'b'\\]"):
        gm(*args, adapter_names=["a", "nope", "a", "a"], **kwargs)
    with pytest.raises(fxpeft.ConfigError, match="one adapter name per batch row"):
        gm(*args, adapter_names="a", **kwargs)
    with pytest.raises(fxpeft.InputShapeError, match="3 entries but the batch has 4 rows"):
        gm(*args, adapter_names=["a", "b", "a"], **kwargs)
    with pytest.raises(fxpeft.InputShapeError, match="1-D int64"):
        fxpeft.mixed_batch(gm)(*args, adapter_index=torch.zeros(4), **kwargs)
    code = gm.code
    fxpeft.merge_adapter(gm, ["a"])
    with pytest.raises(fxpeft.MergeError, match="unmerge_adapter"):
        gm(*args, adapter_names=ROWS, **kwargs)
    assert gm.code == code


def test_methods_without_a_mixed_form_are_refused():
    model, args, kwargs = zoo.tiny_llama(layers=1, batch=4)
    gm = fxpeft.rewrite(fxpeft.trace(model, args, kwargs), fxpeft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                            feedforward_modules=["down_proj"]))
    with pytest.raises(fxpeft.UnsupportedSiteError, match="no mixed-batch form"):
        gm(*args, adapter_names=["default"] * 4, **kwargs)


def test_inference_reuses_stacks_until_a_factor_changes():
    gm, args, kwargs = _adapted(zoo.functional_lm(), (["blocks.0.w_in"], ["blocks.0.w_in", "head"]))
    rows = ["a", "b"]
    with torch.no_grad():
        first = gm(*args, adapter_names=rows, **kwargs)
        assert torch.equal(gm(*args, adapter_names=rows, **kwargs), first)
        for ad in fxpeft.adapters(gm).values():  # an in-place update (an optimizer step, a hot-swap)
            ad.B.mul_(2)
        changed = gm(*args, adapter_names=rows, **kwargs)
    assert not torch.equal(changed, first)
    ref = _per_adapter(gm, args, kwargs)
    for i, name in enumerate(rows):
        assert rel_err(changed[i], ref[name][i]) <= 1e-6
