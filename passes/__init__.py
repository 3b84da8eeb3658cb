"""fxpeft's generic graph passes. Each pass is a frozen dataclass ``GraphModule -> PassResult``: idempotent,
atomic (a failure leaves the graph as it was), and it lints and recompiles at the end. No pass names a method.

Shipped as ``fxpeft.passes``; always import it under that name.
"""

from .attention import NormalizeAttention
from .fold import FoldAdapters
from .fuse import FuseLowRankSiblings, UnfuseLowRankSiblings
from .inject import InjectAdapter
from .merge import MergeAdapters
from .mixed import MixedBatch
from .normalize import DropoutToModule
from .norms import FuseRMSNorm
from .outline import InlineBlocks, OutlineBlocks
from .remove import RemoveAdapters

__all__ = ["InjectAdapter", "MergeAdapters", "RemoveAdapters", "FoldAdapters", "DropoutToModule", "FuseLowRankSiblings",
           "UnfuseLowRankSiblings", "MixedBatch", "NormalizeAttention", "OutlineBlocks", "InlineBlocks"]
