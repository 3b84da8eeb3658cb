"""Many adapters in one graph, under PEFT's names, checked against PEFT on a tiny HF Llama and against eager
PyTorch on a functional model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from conftest import out_tensor, rel_err

import fxpeft
from fxpeft import zoo

peft = pytest.importorskip("peft")
TARGETS = {"default": ["q_proj", "v_proj"], "svd-rank6": ["q_proj", "down_proj"]}


def _lora(name: str) -> fxpeft.LoraConfig:
    return fxpeft.LoraConfig(r=4 if name == "default" else 6, lora_alpha=8, target_modules=TARGETS[name],
                             init_lora_weights=False)


def _peft_copy(pm, gm) -> None:
    with torch.no_grad():
        for m in fxpeft.adapters(gm).values():
            layer = pm.base_model.model.get_submodule(m.site_name)
            layer.lora_A[m.adapter_name].weight.copy_(m.A)
            layer.lora_B[m.adapter_name].weight.copy_(m.B)


@pytest.fixture()
def pair():
    model, args, kwargs = zoo.tiny_llama(layers=1)
    gm = fxpeft.trace(copy.deepcopy(model), args, kwargs)
    base_code = gm.code
    for name in TARGETS:
        fxpeft.rewrite(gm, _lora(name), name)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**{
        k: getattr(_lora("default"), k) for k in ("r", "lora_alpha", "target_modules", "init_lora_weights")}))
    pm.add_adapter("svd-rank6", peft.LoraConfig(r=6, lora_alpha=8, target_modules=TARGETS["svd-rank6"],
                                                init_lora_weights=False))
    _peft_copy(pm, gm)
    return model, gm, pm, args, kwargs, base_code


def _out(m, args, kwargs):
    return out_tensor(m(*args, **kwargs)).detach()


def test_add_set_and_active_adapters_match_peft(pair):
    model, gm, pm, args, kwargs, _ = pair
    assert fxpeft.adapter_names(gm) == ["default", "svd-rank6"]
    assert fxpeft.active_adapters(gm) == pm.active_adapters == ["default"]  # added, not made active
    assert rel_err(_out(gm, args, kwargs), _out(pm, args, kwargs)) <= 1e-5
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == pm.get_nb_trainable_parameters()[0]
    code = gm.code
    for active in (["svd-rank6"], ["default", "svd-rank6"], "default"):
        fxpeft.set_adapter(gm, active)
        pm.base_model.set_adapter(active)
        assert gm.code == code  # no code generation
        assert fxpeft.active_adapters(gm) == ([active] if isinstance(active, str) else active)
        assert rel_err(_out(gm, args, kwargs), _out(pm, args, kwargs)) <= 1e-5
        trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
        assert trainable and all(any(f"lora_{a}." in n for a in fxpeft.active_adapters(gm)) for n in trainable)


def test_disable_restores_even_on_error(pair):
    model, gm, pm, args, kwargs, _ = pair
    base, on = _out(model, args, kwargs), _out(gm, args, kwargs)
    with pytest.raises(RuntimeError):
        with fxpeft.disable_adapters(gm):
            assert torch.equal(_out(gm, args, kwargs), base)
            with pm.disable_adapter():
                assert rel_err(_out(pm, args, kwargs), base) <= 1e-6
            raise RuntimeError("inside the block")
    assert torch.equal(_out(gm, args, kwargs), on)


def test_merge_unmerge_and_their_warnings(pair):
    model, gm, pm, args, kwargs, _ = pair
    weights = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    on = _out(gm, args, kwargs)
    fxpeft.merge_adapter(gm)
    assert rel_err(_out(gm, args, kwargs), on) <= 1e-5
    assert fxpeft.active_adapters(gm) == ["default"]
    with pytest.warns(UserWarning, match="already merged"):
        fxpeft.merge_adapter(gm)
    with pytest.raises(fxpeft.ConfigError, match="unmerge"):
        fxpeft.delete_adapter(gm, "default")
    with fxpeft.disable_adapters(gm):  # a merged adapter is taken out, and put back after
        assert rel_err(_out(gm, args, kwargs), _out(model, args, kwargs)) <= 1e-6
    assert rel_err(_out(gm, args, kwargs), on) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    for n, w in weights.items():
        assert rel_err(gm.get_parameter(n), w) <= 1e-6, n
    with pytest.warns(UserWarning, match="no adapter is merged"):
        fxpeft.unmerge_adapter(gm)


def test_merge_and_unload_match_peft(pair):
    model, gm, pm, args, kwargs, base_code = pair
    fxpeft.set_adapter(gm, ["default", "svd-rank6"])
    pm.base_model.set_adapter(["default", "svd-rank6"])
    merged_ref = _out(pm.merge_and_unload(), args, kwargs)
    unload_gm = copy.deepcopy(gm)
    merged = fxpeft.merge(gm)
    assert merged.code == base_code and not fxpeft.adapters(merged)
    assert rel_err(_out(merged, args, kwargs), merged_ref) <= 1e-5
    fxpeft.unload(unload_gm)
    assert unload_gm.code == base_code
    assert torch.equal(_out(unload_gm, args, kwargs), _out(model, args, kwargs))


def test_delete_adapter_and_bad_names(pair):
    model, gm, pm, args, kwargs, base_code = pair
    code = gm.code
    for call in (lambda: fxpeft.set_adapter(gm, ["default", "nme"]), lambda: fxpeft.delete_adapter(gm, "nme"),
                 lambda: fxpeft.merge_adapter(gm, "nme"), lambda: fxpeft.merge(gm, ["nme"])):
        with pytest.raises(fxpeft.ConfigError, match=r"'nme'.*\['default', 'svd-rank6'\]"):
            call()
        assert gm.code == code and fxpeft.adapter_names(gm) == ["default", "svd-rank6"]
    fxpeft.delete_adapter(gm, "default")  # the active one: nothing else is switched on in its place
    pm.delete_adapter("default")
    assert fxpeft.adapter_names(gm) == ["svd-rank6"] and fxpeft.active_adapters(gm) == []
    assert torch.equal(_out(gm, args, kwargs), _out(model, args, kwargs))  # what runs: nothing
    fxpeft.delete_adapter(gm, "svd-rank6")
    assert gm.code == base_code


class Functional(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(16, 8) / 4)
        self.w2 = torch.nn.Parameter(torch.randn(4, 16) / 4)

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.w1)), self.w2)


def test_lifecycle_on_a_functional_model():
    model, x = Functional(), torch.randn(3, 8)
    ref = model(x).detach()
    gm = fxpeft.trace(model)
    base_code = gm.code
    a = fxpeft.LoraConfig(r=2, target_modules=["w1", "w2"], init_lora_weights=False)
    fxpeft.rewrite(gm, a)
    fxpeft.rewrite(gm, a, "b")
    out_a = gm(x).detach()
    fxpeft.set_adapter(gm, "b")
    out_b = gm(x).detach()
    assert not torch.equal(out_a, out_b)
    with fxpeft.disable_adapters(gm):
        assert torch.equal(gm(x), ref)
    fxpeft.merge_adapter(gm)
    assert rel_err(gm(x), out_b) <= 1e-5
    fxpeft.unmerge_adapter(gm)
    fxpeft.set_adapter(gm, "default")
    assert rel_err(gm(x), out_a) <= 1e-6  # unmerge subtracts the fp32 delta: the base is back to rounding
    fxpeft.unload(gm)
    assert gm.code == base_code and rel_err(gm(x), ref) <= 1e-6


def test_switching_compiled_adapters_does_not_recompile():
    model, x = Functional(), torch.randn(3, 8)
    gm = fxpeft.trace(model, (x,))
    for name in ("a", "b", "c"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["w1", "w2"], init_lora_weights=False), name)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(gm, backend=counter)
    outs, frames = {}, []
    with torch.no_grad():
        for name in ("a", "b", "c", "a", "b", "c"):
            fxpeft.set_adapter(gm, name)
            outs.setdefault(name, compiled(x))
            assert torch.equal(compiled(x), outs[name])
            frames.append(counter.frame_count)
        with fxpeft.disable_adapters(gm):
            assert torch.equal(compiled(x), model(x))
    # Dynamo guards on requires_grad (set_adapter makes only the active adapter trainable, as PEFT does): one
    # compile per distinct active set, then none; the gate itself is a buffer and never recompiles.
    assert frames[2] <= 3 and frames[3:] == [frames[2]] * 3 and counter.frame_count == frames[2]
    assert len({tuple(o.flatten().tolist()) for o in outs.values()}) == 3
    torch._dynamo.reset()
