"""A scratch dict that lives for one call of a graph.

Some values are the same at every site of a call (a mask computed from the call's
``input_ids``): a method may compute one once, keep it here, and let the other sites of the same call read it.
Nothing outlives the call, so no later call, whose inputs may have been rewritten in place in ways autograd's
version counter does not see (a numpy array sharing the memory, a write through ``.data``), can read a stale
value. Outside a graph's call (its ``forward`` called directly, tracing) there is no scratch, and nothing is shared.
"""

from __future__ import annotations

import contextvars
from typing import Any

__all__ = ["CallScope", "call_scratch"]

_SCRATCH: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fxpeft_call_scratch", default=None)


class CallScope:
    """Open a fresh scratch for the block (a graph's call); the previous one (an enclosing call's) comes back after.

    Example:
        >>> from fxpeft.scope import CallScope, call_scratch
        >>> with CallScope():
        ...     call_scratch()["x"] = 1
        >>> call_scratch() is None
        True
    """

    __slots__ = ("_token",)

    def __enter__(self) -> dict:
        scratch: dict[Any, Any] = {}
        self._token = _SCRATCH.set(scratch)
        return scratch

    def __exit__(self, *exc) -> None:
        _SCRATCH.reset(self._token)


def call_scratch() -> dict | None:
    """The scratch of the graph call under way, or None outside one."""
    return _SCRATCH.get()
