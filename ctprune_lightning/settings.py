"""Check a builder's keyword settings against the constructor they go to: one message for every builder.

>>> class Box:
...     def __init__(self, size: int = 1) -> None: ...
>>> check_kwargs("box", "plain", Box, {"sise": 2})
Traceback (most recent call last):
...
TypeError: Unexpected argument(s) ['sise'] for box 'plain'. Allowed: size
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Mapping

__all__ = ["check_kwargs"]


def check_kwargs(kind: str, name: str, cls: type, kwargs: Mapping[str, Any], fixed: Iterable[str] = ()) -> None:
    """``TypeError`` naming the keys of ``kwargs`` that ``cls(...)`` does not take (``fixed``: the ones the builder
    passes itself) and the ones it does."""
    params = inspect.signature(cls.__init__).parameters.values() if cls.__init__ is not object.__init__ else ()
    skip = {"self", *fixed}
    allowed = [p.name for p in params if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unexpected = sorted(k for k in kwargs if k not in allowed)
    if unexpected:
        raise TypeError(f"Unexpected argument(s) {unexpected} for {kind} {name!r}. "
                        f"Allowed: {', '.join(allowed) if allowed else '(none)'}")
