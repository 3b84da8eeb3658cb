"""fxpeft's graph passes. Each pass is a frozen dataclass ``GraphModule -> PassResult``.

Shipped as ``fxpeft.passes``; always import it under that name.
"""

from . import ia3, lora  # noqa: F401  (registers the methods)
from .fuse import FuseLoraSiblings, UnfuseLoraSiblings
from .inject import InjectAdapter
from .merge import MergeAdapters
from .normalize import DropoutToModule

__all__ = ["InjectAdapter", "MergeAdapters", "DropoutToModule", "FuseLoraSiblings", "UnfuseLoraSiblings"]
