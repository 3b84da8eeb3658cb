"""The remove pass is the exact inverse of inject, and adapters switch on and off at run time."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
from conftest import out_tensor, rel_err
from fxpeft.passes import RemoveAdapters

import fxpeft
from fxpeft import zoo


def _graphs():
    model, args, kwargs = zoo.tiny_llama(layers=1)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return [("llama-export", model, fxpeft.trace(model, args, kwargs), (args, kwargs), ["q_proj", "v_proj", "down_proj"]),
            ("mlp-fx", mlp, fxpeft.trace(mlp), ((torch.randn(3, 8),), {}), ["0", "2"])]


@pytest.fixture(scope="module", params=[0, 1], ids=["llama-export", "mlp-fx"])
def case(request):
    return _graphs()[request.param]


@pytest.mark.parametrize("config", [
    lambda t: fxpeft.LoraConfig(r=4, lora_dropout=0.1, target_modules=t, init_lora_weights=False),
    lambda t: fxpeft.IA3Config(target_modules=t, feedforward_modules=t[-1:], init_ia3_weights=False),
], ids=["lora", "ia3"])
def test_remove_restores_code_state_and_flags(case, config):
    _, _, base, (args, kwargs), targets = case
    gm = copy.deepcopy(base)
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    flags = {n: p.requires_grad for n, p in gm.named_parameters()}
    ref = out_tensor(gm(*args, **kwargs))
    fxpeft.rewrite(gm, config(targets))
    fxpeft.rewrite(gm, config(targets[:1]), "second")  # a second adapter of the same method on one site
    assert rel_err(out_tensor(gm(*args, **kwargs)), ref) > 1e-4  # the adapters do change the outputs
    assert RemoveAdapters(("default",))(gm).modified
    assert RemoveAdapters(("second",))(gm).modified
    assert gm.code == code
    assert gm.state_dict().keys() == state.keys()
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in gm.named_parameters()} == flags
    assert torch.equal(out_tensor(gm(*args, **kwargs)), ref)
    assert not RemoveAdapters()(gm).modified


def test_remove_unknown_name_is_a_typed_error_and_changes_nothing(case):
    _, _, base, _, targets = case
    gm = fxpeft.rewrite(copy.deepcopy(base), fxpeft.LoraConfig(r=4, target_modules=targets))
    code = gm.code
    with pytest.raises(fxpeft.ConfigError, match=r"no adapter named 'nme'.*\['default'\]"):
        RemoveAdapters(("nme",))(gm)
    with pytest.raises(fxpeft.ConfigError, match=r"\['default'\]"):
        fxpeft.merge(gm, ["nme"])
    assert gm.code == code and fxpeft.adapters(gm)


def test_switching_off_needs_no_new_code_and_gives_the_base_outputs(case):
    _, _, base, (args, kwargs), targets = case
    ref = out_tensor(base(*args, **kwargs)).detach()
    gm = fxpeft.rewrite(copy.deepcopy(base), fxpeft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=targets[:1], init_lora_weights=False), "second")
    on = out_tensor(gm(*args, **kwargs)).detach()
    code = gm.code
    was = {ad: ad.active for ad in fxpeft.adapters(gm).values()}  # "second" was added inactive, as in PEFT
    for ad in was:
        ad.set_active(False)
    assert gm.code == code
    assert torch.equal(out_tensor(gm(*args, **kwargs)), ref)
    for ad, on_ in was.items():
        ad.set_active(on_)
    assert torch.equal(out_tensor(gm(*args, **kwargs)), on)


def test_switching_off_under_torch_compile_needs_no_recompile():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    gm = fxpeft.rewrite(fxpeft.trace(mlp, (x,)), fxpeft.LoraConfig(r=4, target_modules=["0", "2"],
                                                                   init_lora_weights=False))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(gm, backend=counter)
    on = compiled(x)
    for ad in fxpeft.adapters(gm).values():
        ad.set_active(False)
    off = compiled(x)
    assert counter.frame_count == 1
    assert torch.equal(off, mlp(x)) and not torch.equal(on, off)
    torch._dynamo.reset()
