"""Arrays lent out and taken back, so that batches cut from every slice of a series reuse memory.

A fresh array of a few MB comes from the kernel as new pages: each is faulted in and zeroed on
first write, which costs about as much as filling it. The sliding window cuts its windows into
such arrays for every slice; taking them from here instead, and giving them back once the model's
results for them are in, skips that. This is a cache of scratch memory (like numpy's own for
small arrays), so it is kept with the cached tiling plan rather than passed around; it holds only
arrays nobody else refers to and is safe to share between threads.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np


class BatchBuffers:
    """Free arrays by (shape, dtype), at most ``max_bytes`` of them kept."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._free: dict[tuple[tuple[int, ...], np.dtype[Any]], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype`` with undefined contents."""
        with self._lock:
            free = self._free.get((shape, dtype))
            if free:
                array = free.pop()
                self._bytes -= array.nbytes
                return array
        return np.empty(shape, dtype)

    def give(self, array: np.ndarray) -> None:
        """Take ``array`` back (the caller no longer uses it, and nobody else refers to it);
        dropped when the pool is full."""
        with self._lock:
            if self._bytes + array.nbytes > self._max_bytes:
                return
            self._free.setdefault((array.shape, array.dtype), []).append(array)
            self._bytes += array.nbytes
