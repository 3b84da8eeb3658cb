"""FSDP2 per layer on a rewritten graph: :func:`shard` outlines the repeated blocks, then applies ``fully_shard`` to
each block and to the root.

An export graph is flat, so ``fully_shard(gm.get_submodule("model.layers.0"))`` has no forward to hook: the layer's
parameters would never be gathered. :class:`fxpeft.passes.OutlineBlocks` gives every layer a forward of its own
(a ``call_module`` to a graph submodule at the layer's path, owning its base weights and adapters); this module
shards those.

**Mixed dtypes in one group.** A frozen bf16 base with fp32 adapters puts two dtypes in one layer's group. In
torch 2.13, FSDP2 asks only the *trainable* parameters of a group to share one dtype (``_init_mp_dtypes``: their
gradients are reduce-scattered in one buffer), and all-gathers a group whose parameters differ in dtype as bytes
(``uint8`` views), so each parameter comes back in its own dtype. So :func:`shard` uses one group per layer and the
default ``MixedPrecisionPolicy()`` (no ``param_dtype``): the base is gathered and computed in bf16, the adapters in
fp32 (their graph casts activations, as unsharded), and adapter gradients are reduced in fp32. A ``param_dtype``
policy would instead run the adapters in bf16. Trainable parameters of two dtypes in one layer are refused, before
anything is sharded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .errors import ConfigError
from .passes.outline import OutlineBlocks, is_sharded, outlined_blocks

__all__ = ["shard"]


def _check(gm: fx.GraphModule, blocks: dict[str, torch.nn.Module]) -> None:
    """Refuse what FSDP2 would get wrong later: a block's parameter read outside its forward (never gathered
    there), and trainable parameters of two dtypes in one group."""
    outside = [n.target for n in gm.graph.nodes if n.op == "get_attr"
               and any(n.target.startswith(p + ".") for p in blocks)]
    if outside:
        raise ConfigError(f"the root graph reads {outside[:3]} from inside outlined blocks; fully_shard gathers a "
                          "block's parameters only for its own forward. Those reads must move into the block "
                          "(OutlineBlocks moves reads used only by the block) or the tensor out of it")
    owned = {id(p) for b in blocks.values() for p in b.parameters()}
    groups = {**blocks, "<root>": None}
    for name, block in groups.items():
        params = block.parameters() if block is not None else (p for p in gm.parameters() if id(p) not in owned)
        dtypes = {p.dtype for p in params if p.requires_grad}
        if len(dtypes) > 1:
            raise ConfigError(f"{name} has trainable parameters of dtypes {sorted(map(str, dtypes))}; FSDP2 reduces a "
                              "group's gradients in one dtype. Keep the adapters in one dtype (e.g. fp32 adapters: "
                              "autocast_adapter_dtype=True) or freeze the others")


def shard(gm: fx.GraphModule, *, mesh: Any = None, mp_policy: Any = None, reshard_after_forward: bool = True,
          outline: bool = True) -> fx.GraphModule:
    """Shard ``gm`` with FSDP2: ``fully_shard`` on each outlined block (one group per decoder layer), then the root.

    Call it on every rank, after the rewrite and before the optimizer is built (the parameters become DTensor
    shards). Adapter files: save with :func:`fxpeft.save_adapter` before sharding, or use
    ``torch.distributed.checkpoint`` on the sharded state.

    Args:
        gm: a rewritten graph (flat, or already outlined with :class:`fxpeft.passes.OutlineBlocks`).
        mesh: the ``DeviceMesh`` (default: FSDP2's, over all ranks, on CUDA when there is one).
        mp_policy: a ``MixedPrecisionPolicy`` (default: none, so each parameter computes in its own dtype; see
            the module docstring for why that is the right default for a bf16 base with fp32 adapters).
        reshard_after_forward: passed to each block's ``fully_shard`` (the root keeps FSDP2's own default).
        outline: outline a flat graph first. With False, a graph without outlined blocks is refused.

    Returns:
        ``gm`` (sharded in place; its class becomes an ``FSDPModule`` subclass). A graph already sharded is returned
        as it is.

    Raises:
        ConfigError: ``gm`` has no outlined block (and ``outline=False``, or nothing repeats in it), no process
            group is initialised, a block's parameter is read outside its forward, or a group's trainable
            parameters mix dtypes. Nothing is sharded then.
    """
    from torch.distributed import is_initialized
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not is_initialized():
        raise ConfigError("fxpeft.shard needs a process group: torch.distributed.init_process_group(...) first "
                          "(run under torchrun)")
    if is_sharded(gm):
        return gm
    if not outlined_blocks(gm):
        if not outline:
            raise ConfigError("this graph was not outlined: fully_shard per layer needs a forward per layer. Run "
                              "fxpeft.passes.OutlineBlocks()(gm) first, or call fxpeft.shard(gm) with outline=True")
        OutlineBlocks()(gm)
    blocks = outlined_blocks(gm)
    if not blocks:
        raise ConfigError("fxpeft.shard found no repeated block (numbered sibling modules such as model.layers.<k>) "
                          "in this graph's nn_module_stack; shard the root alone with fully_shard(gm)")
    _check(gm, blocks)
    kwargs: dict[str, Any] = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
    if mesh is not None:
        kwargs["mesh"] = mesh
    for block in blocks.values():
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(gm, **kwargs)
    return gm
