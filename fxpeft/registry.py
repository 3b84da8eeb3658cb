"""The method registry: a PEFT method is a config, an inject rule and a fold (merge) rule.

A new method is one file in ``passes/`` that subclasses :class:`Method` and registers it::

    @PeftRegistry.register("lora")
    class Lora(Method):
        config_cls = LoraConfig
        ...

The generic passes (``fxpeft.passes.inject``, ``fxpeft.passes.merge``) do the graph surgery bookkeeping
(targeting, validation, tagging, freezing, removal); the method only says what to build and how to fold it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from .errors import ConfigError
from .sites import Call, Site

__all__ = ["PeftRegistry", "Method", "AdapterModule", "PeftConfigBase", "Emit"]


@dataclass
class PeftConfigBase:
    """Fields every method's config has. ``peft_type`` names the registered method."""

    peft_type: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"peft_type": self.peft_type.upper(), **asdict(self)}


class AdapterModule(nn.Module):
    """Base class of the small submodules that hold one adapter's parameters at one site.

    Passes find adapters by this type and by node tags, never by attribute names.
    """

    method: ClassVar[str] = ""

    def __init__(self, site_name: str, adapter_name: str) -> None:
        super().__init__()
        self.site_name = site_name
        self.adapter_name = adapter_name

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}, adapter={self.adapter_name!r}"


class Emit:
    """Inserts tagged nodes into a graph with the right ops for its dialect.

    Every node created through it carries ``node.meta["fxpeft"] = {method, adapter, site, role, module}``.
    """

    def __init__(self, gm: fx.GraphModule, dialect: str, method: str, adapter: str, site: str, module: str,
                 anchor: fx.Node | None = None):
        self.graph = gm.graph
        self.anchor = anchor  # the site's call: inserted nodes inherit its module stack
        self.export = dialect == "export"
        self.tag = {"method": method, "adapter": adapter, "site": site, "module": module}

    def _node(self, op: str, target, args, role: str, meta_from: fx.Node | None = None) -> fx.Node:
        # Names like ``q_proj_lora_A`` make gm.code read as the adapter it is.
        node = self.graph.create_node(op, target, tuple(args), name=f"{self.tag['site'].replace('.', '_')}_{role}")
        node.meta["fxpeft"] = dict(self.tag, role=role)
        meta_from = meta_from if meta_from is not None else self.anchor
        if meta_from is not None and "nn_module_stack" in meta_from.meta:
            node.meta["nn_module_stack"] = dict(meta_from.meta["nn_module_stack"])
        return node

    def get_attr(self, attr: str, role: str) -> fx.Node:
        return self._node("get_attr", f"{self.tag['module']}.{attr}", (), role)

    def call_module(self, sub: str, x: fx.Node, role: str) -> fx.Node:
        return self._node("call_module", f"{self.tag['module']}.{sub}", (x,), role)

    def fn(self, which: str, *args, role: str) -> fx.Node:
        aten = torch.ops.aten
        table = {
            "linear": (aten.linear.default, torch.nn.functional.linear),
            "mul": (aten.mul.Tensor, torch.mul),
            "add": (aten.add.Tensor, torch.add),
            "t": (aten.t.default, torch.t),
            "embedding": (aten.embedding.default, torch.nn.functional.embedding),
            "conv1d": (aten.conv1d.default, torch.nn.functional.conv1d),
            "conv2d": (aten.conv2d.default, torch.nn.functional.conv2d),
            "conv3d": (aten.conv3d.default, torch.nn.functional.conv3d),
            "conv1d_str": (aten.conv1d.padding, torch.nn.functional.conv1d),
            "conv2d_str": (aten.conv2d.padding, torch.nn.functional.conv2d),
            "conv3d_str": (aten.conv3d.padding, torch.nn.functional.conv3d),
        }
        return self._node("call_function", table[which][0 if self.export else 1], args, role)


class Method:
    """One PEFT method. Subclasses set ``config_cls`` and implement the four hooks below."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = PeftConfigBase

    @classmethod
    def validate_config(cls, config: Any) -> None:
        """Raise :class:`ConfigError` for invalid field values."""

    @classmethod
    def check_site(cls, site: Site, config: Any) -> str | None:
        """Return why the method cannot adapt ``site``, or None if it can."""
        return None

    @classmethod
    def build(cls, site: Site, config: Any, adapter_name: str, weight: torch.Tensor) -> AdapterModule:
        """Create the adapter submodule for one site (no graph change)."""
        raise NotImplementedError

    @classmethod
    def insert(cls, emit: Emit, call: Call, site: Site, adapter: AdapterModule) -> None:
        """Insert the adapter's nodes around one call. Must set exactly one node's role to ``"out"``.

        The ``"out"`` node's first argument is the value it replaces, so that the merge pass can bypass it.
        """
        raise NotImplementedError

    @classmethod
    def fold(cls, adapter: AdapterModule, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        """Fold the adapter into fp32 copies of the base weight/bias; return (weight, bias)."""
        raise NotImplementedError


class PeftRegistry:
    """Maps method names (``"lora"``, ``"ia3"``) to :class:`Method` classes.

    Example:
        >>> from fxpeft import PeftRegistry, LoraConfig
        >>> PeftRegistry.for_config(LoraConfig(target_modules=["q"])).name
        'lora'
    """

    _methods: ClassVar[dict[str, type[Method]]] = {}

    @classmethod
    def register(cls, name: str):
        def deco(method: type[Method]) -> type[Method]:
            if name in cls._methods:
                raise ValueError(f"method {name!r} is already registered")
            method.name = name
            method.config_cls.peft_type = name.upper()
            cls._methods[name] = method
            return method

        return deco

    @classmethod
    def get(cls, name: str) -> type[Method]:
        try:
            return cls._methods[name.lower()]
        except KeyError:
            raise ConfigError(f"unknown PEFT method {name!r}; registered: {sorted(cls._methods)}") from None

    @classmethod
    def for_config(cls, config: Any) -> type[Method]:
        for method in cls._methods.values():
            if isinstance(config, method.config_cls):
                return method
        raise ConfigError(
            f"{type(config).__name__} is not a registered method config; use one of "
            f"{[m.config_cls.__name__ for m in cls._methods.values()]}"
        )

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._methods)
