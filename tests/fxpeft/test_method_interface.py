"""The method interface reaches what DoRA, OFT and VeRA need: a method can read the site's weight as a graph
value and replace what the call reads, and it can own state shared by every site, saved and loaded with it.
Two small methods, written here against the public API, check it against eager formulas."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from conftest import out_tensor, rel_err
from torch import nn

import fxpeft
from fxpeft import (
    AdapterModule,
    Emit,
    Method,
    PeftConfigBase,
    PeftRegistry,
    Role,
    Site,
    zoo,
)

aten = torch.ops.aten


# ------------------------------------------------- a method that replaces the weight the call reads: W' = W * s


@dataclass
class RowScaleConfig(PeftConfigBase):
    init: float = 0.0


class RowScaleAdapter(AdapterModule):
    method = "test_rowscale"

    def __init__(self, site: Site, name: str, weight: torch.Tensor, init: float) -> None:
        super().__init__(site.name, name)
        self.fan_in_fan_out = site.fan_in_fan_out
        self.s = nn.Parameter(1 + init * torch.randn(site.out_features, dtype=weight.dtype))

    def vector(self) -> torch.Tensor:  # broadcast over the weight's output axis
        return self.s.view(1, -1) if self.fan_in_fan_out else self.s.view(-1, 1)


class RowScale(Method):
    config_cls = RowScaleConfig
    site_kinds = frozenset({"linear"})

    @classmethod
    def check_site(cls, site, config):
        if site.calls[0].weight_node is None:
            return "needs the weight as a graph value (trace with example inputs)"
        return super().check_site(site, config)

    @classmethod
    def build(cls, site, config, name, weight):
        return RowScaleAdapter(site, name, weight, config.init)

    @classmethod
    def insert(cls, emit: Emit, site, adapter):
        shape = [1, -1] if site.fan_in_fan_out else [-1, 1]
        s = emit.op(aten.view.default, emit.param("s"), shape)
        s = emit.op(aten.where.ScalarOther, emit.param("gate"), s, 1.0)
        weight = emit.weight()  # the site's weight, read as a graph value
        new = emit.op(aten.mul.Tensor, weight, s, role=Role.OUT, replaces=0)  # stands for the weight
        emit.replace_input(emit.call.weight_node, new)

    @classmethod
    def fold(cls, adapter, site, weight, bias):
        return weight * adapter.vector().detach().float(), bias

    @classmethod
    def unfold(cls, adapter, site, weight, bias):
        return weight / adapter.vector().detach().float(), bias


# ------------------------------------------ a method with state shared by every site (VeRA-like frozen A and B)


@dataclass
class SharedProjConfig(PeftConfigBase):
    r: int = 4


class SharedProjAdapter(AdapterModule):
    method = "test_sharedproj"

    def __init__(self, site: Site, name: str, r: int, weight: torch.Tensor) -> None:
        super().__init__(site.name, name)
        self.d = nn.Parameter(torch.ones(r, dtype=weight.dtype))
        self.b = nn.Parameter(torch.zeros(site.out_features, dtype=weight.dtype))


class SharedProj(Method):
    config_cls = SharedProjConfig
    site_kinds = frozenset({"linear"})

    @classmethod
    def check_site(cls, site, config):
        if site.fan_in_fan_out:
            return "stored [in, out]"
        return super().check_site(site, config)

    @classmethod
    def shared_state(cls, config, sites, name, dtype, device):
        shared = nn.Module()
        width = max(s.in_features for s in sites), max(s.out_features for s in sites)
        g = torch.Generator().manual_seed(0)
        shared.A = nn.Parameter(torch.randn(config.r, width[0], generator=g, dtype=dtype), requires_grad=False)
        shared.B = nn.Parameter(torch.randn(width[1], config.r, generator=g, dtype=dtype), requires_grad=False)
        return shared

    @classmethod
    def build(cls, site, config, name, weight):
        return SharedProjAdapter(site, name, config.r, weight)

    @classmethod
    def insert(cls, emit: Emit, site, adapter):
        A = emit.op(aten.slice.Tensor, emit.shared("A"), 1, 0, site.in_features)   # [r, in]
        B = emit.op(aten.slice.Tensor, emit.shared("B"), 0, 0, site.out_features)  # [out, r]
        h = emit.op(aten.linear.default, emit.call.input, A)                       # [..., r]
        h = emit.op(aten.mul.Tensor, h, emit.param("d"))
        h = emit.op(aten.mul.Tensor, emit.op(aten.linear.default, h, B), emit.param("b"))  # [..., out]
        h = emit.op(aten.mul.Tensor, h, emit.param("gate"))
        emit.replace_output(emit.op(aten.add.Tensor, emit.call.node, h, role=Role.OUT, replaces=0))

    @classmethod
    def fold(cls, adapter, site, weight, bias):
        shared = adapter.shared
        A, B = shared.A[:, : site.in_features].float(), shared.B[: site.out_features].float()
        return weight + (adapter.b.detach().float()[:, None] * B) @ (adapter.d.detach().float()[:, None] * A), bias

    @classmethod
    def site_shapes(cls, config, site):
        return {"sp_d": (config.r,), "sp_b": (site.out_features,)}

    @classmethod
    def site_tensors(cls, adapter, site):
        return {"sp_d": adapter.d.detach(), "sp_b": adapter.b.detach()}

    @classmethod
    def load_site_tensors(cls, adapter, site, tensors):
        with torch.no_grad():
            adapter.d.copy_(tensors["sp_d"]), adapter.b.copy_(tensors["sp_b"])

    @classmethod
    def config_fields(cls, adapters, sites, keys_for, target_modules):
        return {"r": next(iter(adapters.values())).d.shape[0]}

    @classmethod
    def shared_shapes(cls, config, sites):
        return {"base_model.sp_A": (config.r, max(s.in_features for s in sites)),
                "base_model.sp_B": (max(s.out_features for s in sites), config.r)}

    @classmethod
    def shared_tensors(cls, shared):
        return {"base_model.sp_A": shared.A, "base_model.sp_B": shared.B}

    @classmethod
    def load_shared_tensors(cls, shared, tensors):
        with torch.no_grad():
            shared.A.copy_(tensors["base_model.sp_A"]), shared.B.copy_(tensors["base_model.sp_B"])


@pytest.fixture(scope="module", autouse=True)
def registered():
    PeftRegistry.register("test_rowscale")(RowScale)
    PeftRegistry.register("test_sharedproj")(SharedProj)
    yield
    PeftRegistry.unregister("test_rowscale")
    PeftRegistry.unregister("test_sharedproj")


@pytest.fixture(scope="module")
def llama():
    model, args, kwargs = zoo.tiny_llama(layers=1)
    return model, fxpeft.trace(model, args, kwargs), args, kwargs


def test_a_method_can_replace_the_weight_the_call_reads(llama):
    model, base, args, kwargs = llama
    gm = fxpeft.rewrite(copy.deepcopy(base), RowScaleConfig(target_modules=["q_proj", "o_proj"], init=0.5))
    ref_model = copy.deepcopy(model)
    with torch.no_grad():  # the eager reference: the same row scales applied to the weights
        for m in fxpeft.adapters(gm).values():
            ref_model.get_submodule(m.site_name).weight.mul_(m.s.view(-1, 1))
    out = out_tensor(gm(*args, **kwargs)).detach()
    assert rel_err(out, out_tensor(ref_model(*args, **kwargs))) <= 1e-5
    loss = out_tensor(gm(*args, **kwargs)).square().mean()
    loss.backward()
    assert all(m.s.grad is not None and m.s.grad.abs().sum() > 0 for m in fxpeft.adapters(gm).values())
    assert rel_err(out_tensor(fxpeft.merge(gm)(*args, **kwargs)), out) <= 1e-5
    assert gm.code == base.code


def test_state_shared_by_every_site_is_read_saved_and_loaded(llama, tmp_path):
    model, base, args, kwargs = llama
    gm = fxpeft.rewrite(copy.deepcopy(base), SharedProjConfig(target_modules=["q_proj", "down_proj"], r=3))
    shared = getattr(gm, Method.shared_path("test_sharedproj", "default"))
    assert not shared.A.requires_grad  # the method's own flags: frozen, as VeRA's matrices are
    for m in fxpeft.adapters(gm).values():
        m.shared = shared
        with torch.no_grad():
            m.b.normal_()
    out = out_tensor(gm(*args, **kwargs)).detach()
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for m in fxpeft.adapters(gm).values():
            w = ref_model.get_submodule(m.site_name).weight
            w.copy_(SharedProj.fold(m, fxpeft.find_sites(gm)[m.site_name], w.float(), None)[0])
    assert rel_err(out, out_tensor(ref_model(*args, **kwargs))) <= 1e-5
    fxpeft.save_adapter(gm, tmp_path)
    again = fxpeft.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(out_tensor(again(*args, **kwargs)), out)
    fxpeft.delete_adapter(gm, "default")
    assert not hasattr(gm, Method.shared_path("test_sharedproj", "default")) and gm.code == base.code
