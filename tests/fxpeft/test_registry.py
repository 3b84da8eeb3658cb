"""The plug-in point is open: no core file names a method, and a new method needs no core edit."""

from __future__ import annotations

import pathlib
import re

import torch

import fxpeft
from fxpeft.registry import PeftRegistry, fx_callable

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_no_method_name_outside_the_method_files():
    literal = re.compile(r"[\"'](lora|ia3)[\"']")
    hits = [f"{p.relative_to(ROOT)}:{i}" for folder in ("fxpeft", "passes") for p in (ROOT / folder).rglob("*.py")
            if p.parent.name != "methods"
            for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert hits == []


def test_every_registered_method_says_everything_about_itself():
    shipped = [m for m in PeftRegistry.methods() if m.__module__.startswith("fxpeft.")]
    assert {"lora", "ia3"} <= {m.name for m in shipped}
    for method in shipped:
        assert method.display_name and method.color and method.config_cls.peft_type == method.name.upper()
        assert method.__module__.startswith("fxpeft.methods."), method  # one file per method
        for hook in ("build", "insert", "fold", "unfold", "site_shapes", "site_tensors", "load_site_tensors"):
            assert getattr(method, hook).__func__ is not getattr(fxpeft.Method, hook).__func__, (method, hook)


def test_one_rule_maps_aten_ops_to_the_symbolic_dialect():
    import torch

    aten = torch.ops.aten
    assert fx_callable(aten.mul.Tensor) is torch.mul
    assert fx_callable(aten.linear.default) is torch._C._nn.linear
    assert fx_callable(aten.embedding.default) is torch.embedding  # aten's argument order, not F.embedding's
    assert fx_callable(aten._to_copy.default) is aten._to_copy.default  # no binding: the op itself


def test_stack_slots_reuses_a_stack_until_a_slot_changes():
    from fxpeft.registry import stack_slots

    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(1, 3))
    with torch.no_grad():
        first = stack_slots(2, 0, a, b, None)
        assert first.shape == (3, 2, 3) and stack_slots(2, 0, a, b, None) is first  # served again
        assert torch.equal(first[1], torch.tensor([[1.0] * 3, [0.0] * 3]))  # padded to rank 2
        b.mul_(2)  # in place: a new version
        assert torch.equal(stack_slots(2, 0, a, b, None)[1, 0], torch.full((3,), 2.0))
        b.data = torch.full((1, 3), 5.0)  # new data, same parameter and version: a new storage
        assert torch.equal(stack_slots(2, 0, a, b, None)[1, 0], torch.full((3,), 5.0))
    with torch.enable_grad():
        assert stack_slots(2, 0, a, b, None) is not stack_slots(2, 0, a, b, None)  # under autograd: never kept
