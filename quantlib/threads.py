"""Scoped torch intra-op thread count.

:func:`torch_threads` sets ``torch.set_num_threads`` for a block and restores the previous count
afterwards, also when the block raises. Layer-wise PTQ passes use it to run small optimization
steps on one thread; ``quantzoo reproduce`` uses it to re-run with a record's thread count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, then restore the previous number (None: unchanged)."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
