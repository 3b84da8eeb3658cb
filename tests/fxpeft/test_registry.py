"""The plug-in point is open: no core file names a method, and a new method needs no core edit."""

from __future__ import annotations

import pathlib
import re

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
