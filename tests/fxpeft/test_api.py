"""trace's shape contract, and PEFT's adapter dtype on a half-precision base."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import out_tensor, rel_err

import fxpeft
from fxpeft import zoo
from fxpeft.tags import graph_info


class FixedLength(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        return x + self.pos  # the model fixes the sequence length at 16


def test_fixed_dims_warn_and_a_wrong_shape_names_the_dim_and_why():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = fxpeft.trace(FixedLength(), (torch.randn(2, 16, 8),))
    assert any("x.shape[1] is fixed at 16: the model fixes it" in str(w.message) for w in caught)
    assert graph_info(gm).dynamic_dims == {"x": [0]}
    assert gm(torch.randn(5, 16, 8)).shape == (5, 16, 8)
    with pytest.raises(fxpeft.InputShapeError, match=r"x.shape\[1\] must be 16: .*the model fixes it"):
        gm(torch.randn(2, 17, 8))


def test_batch_of_one_warns_and_names_the_reason():
    with pytest.warns(UserWarning, match=r"input.shape\[0\] is fixed at 1: the example has size 1"):
        gm = fxpeft.trace(torch.nn.Linear(4, 4), (torch.randn(1, 4),))
    with pytest.raises(fxpeft.InputShapeError, match=r"must be 1: .*size 1"):
        gm(torch.randn(3, 4))


def test_sliced_example_inputs_do_not_break_other_shapes():
    model, _, _ = zoo.tiny_llama(layers=1)
    big = torch.randint(0, 100, (6, 20))
    gm = fxpeft.trace(model, (), {"input_ids": big[:, 2:10], "use_cache": False})  # a strided view
    ids = torch.randint(0, 100, (3, 7))
    assert torch.equal(gm(input_ids=ids).logits, model(input_ids=ids, use_cache=False).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_gets_fp32_adapters_with_peft_outputs(dtype):
    peft = pytest.importorskip("peft")
    model, args, kwargs = zoo.tiny_llama(layers=1)
    model = model.to(dtype)
    gm = fxpeft.rewrite(fxpeft.trace(model, args, kwargs),
                        fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                          init_lora_weights=False))
    assert {p.dtype for n, p in gm.named_parameters() if p.requires_grad} == {torch.float32}
    casts = [n for n in gm.graph.nodes if (t := fxpeft.tags.get_tag(n)) and t.role is fxpeft.Role.CAST]
    assert casts  # the casts are graph nodes
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                  target_modules=["q_proj", "v_proj", "embed_tokens"]))
    with torch.no_grad():
        for m in fxpeft.adapters(gm).values():
            layer = pm.base_model.model.get_submodule(m.site_name)
            if m.kind == "embedding":
                layer.lora_embedding_A["default"].copy_(m.A), layer.lora_embedding_B["default"].copy_(m.B)
            else:
                layer.lora_A["default"].weight.copy_(m.A), layer.lora_B["default"].weight.copy_(m.B)
    assert next(iter(pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A.values())).weight.dtype == torch.float32
    ours, theirs = out_tensor(gm(*args, **kwargs)), out_tensor(pm(*args, **kwargs))
    assert ours.dtype == theirs.dtype == dtype
    assert rel_err(ours.float(), theirs.float()) <= 1e-2  # half-precision logits; the same ops in the same dtypes
    unmerged = ours.float()
    merged = out_tensor(fxpeft.merge(gm)(*args, **kwargs)).float()
    assert rel_err(merged, unmerged) <= 2e-2  # merged weights are rounded to the half dtype once


def test_keep_base_dtype_keeps_half_adapters():
    model, args, kwargs = zoo.tiny_llama(layers=1)
    gm = fxpeft.rewrite(fxpeft.trace(model.to(torch.bfloat16), args, kwargs),
                        fxpeft.LoraConfig(r=4, target_modules=["q_proj"], keep_base_dtype=True))
    assert {p.dtype for n, p in gm.named_parameters() if p.requires_grad} == {torch.bfloat16}
    assert not [n for n in gm.graph.nodes if (t := fxpeft.tags.get_tag(n)) and t.role is fxpeft.Role.CAST]


def test_trace_kwargs_in_any_order_stay_dynamic_and_flags_become_defaults():
    # torch.export pairs a tuple of dim specs with the signature's order; fxpeft names them, and moves flags
    # (use_cache) after the tensors so they can be defaults of forward.
    model, _, kwargs = zoo.tiny_llama(layers=1)
    ids = kwargs["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "could not be exported with every dim dynamic"
        gm = fxpeft.trace(model, (), {"input_ids": ids, "use_cache": False, "attention_mask": torch.ones_like(ids)})
    ids2 = torch.randint(0, 256, (3, 7))
    mask = torch.ones_like(ids2)
    expected = model(input_ids=ids2, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(gm(input_ids=ids2, attention_mask=mask).logits, expected, atol=1e-5)


def test_hf_model_with_its_cache_on_traces_without_asking_for_use_cache_false():
    from fxpeft.zoo import tiny_llama

    model, args, kwargs = tiny_llama(layers=1)
    kwargs.pop("use_cache", None)
    model.config.use_cache = True  # HF's default: forward returns a DynamicCache that torch.export cannot output
    gm = fxpeft.trace(model, args, kwargs)
    assert torch.equal(gm(**kwargs).logits, model(**kwargs, use_cache=False).logits)
