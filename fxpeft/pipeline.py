"""The rewrite pipeline shared by :func:`fxpeft.rewrite` and :func:`fxpeft.load_adapter`: inject, then fuse."""

from __future__ import annotations

from typing import Any

from torch import fx

from .errors import ConfigError
from .passes import FuseLowRankSiblings, InjectAdapter
from .passes.transaction import lint, transaction
from .registry import PeftRegistry
from .serialize import defer_codegen

__all__ = ["rewrite_graph"]


def rewrite_graph(gm: fx.GraphModule, config: Any, adapter_name: str = "default", *, fuse: bool = True) -> fx.GraphModule:
    """Inject one adapter and (by default) fuse sibling chains; lint once, and generate the code at its first use."""
    if not isinstance(gm, fx.GraphModule):
        raise ConfigError(f"rewrite takes the graph of a model (a torch.fx.GraphModule), got {type(gm).__name__}; "
                          "capture the model first: gm = fxpeft.trace(model, args, kwargs)")
    # Code generation is the costliest step on a big graph (more than the edits): defer it to the first call or
    # ``gm.code`` read (fxpeft.serialize.defer_codegen), lint once at the end. Every pass is atomic; the
    # outer transaction makes the whole rewrite atomic too, companions (another method's adapter that the config
    # asks for beside its own, under the same name: Method.companions) included.
    with transaction(gm):
        InjectAdapter(config, adapter_name, recompile=False)(gm)
        for extra in PeftRegistry.for_config(config).companions(config):
            InjectAdapter(extra, adapter_name, recompile=False)(gm)
        if not fuse or not FuseLowRankSiblings(adapter_names=(adapter_name,), recompile=False)(gm).modified:
            lint(gm)  # the fuse pass lints what it changes
        defer_codegen(gm)
    return gm
