"""CPU threading for small training loops: on tiny matrices extra intra-op threads only add
synchronisation (and, on a shared machine, contention), so small problems run single-threaded."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def cpu_threads(work: int, threads: int = 0, small: int = 2**24) -> Iterator[int]:
    """Run the block with `threads` torch threads (0 = auto: 1 when `work`, a rough multiply-add
    count per step, is below `small`, else the current setting); restores the old setting."""
    old = torch.get_num_threads()
    n = threads or (1 if work < small else old)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)
