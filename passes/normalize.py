"""Normalisation passes run by :func:`fxpeft.trace` on an export graph, so it behaves like the module it came from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from fxpeft.sites import _attr

__all__ = ["DropoutToModule"]

_DROPOUT_OPS = {torch.ops.aten.dropout.default: nn.Dropout, torch.ops.aten.feature_dropout.default: nn.Dropout2d,
                torch.ops.aten.alpha_dropout.default: nn.AlphaDropout}


@dataclass(frozen=True)
class DropoutToModule:
    """Turn ``aten.dropout(x, p, train=True)`` into ``call_module`` on an ``nn.Dropout``.

    torch.export bakes a dropout's mode into the graph. fxpeft traces with dropout modules in training
    mode, then gives each captured dropout back its module, at its original path, so that
    ``gm.train()`` / ``gm.eval()`` switch it as they would in eager PyTorch. Idempotent: a graph with no
    ``aten.dropout`` left is unchanged.
    """

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            cls = _DROPOUT_OPS.get(node.target) if node.op == "call_function" else None
            if cls is None or not node.args[2]:
                continue
            stack = node.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else "dropout"
            path = path or "dropout"
            base, k = path, 1
            while _attr(gm, path) is not None:
                path, k = f"{base}_{k}", k + 1
            gm.add_submodule(path, cls(p=float(node.args[1])))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(path, (node.args[0],))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

