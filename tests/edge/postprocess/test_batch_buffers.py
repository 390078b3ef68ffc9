"""Batch arrays lent and taken back: reuse by shape and dtype, a bound on what is kept."""

from __future__ import annotations

import numpy as np

from edge.postprocess.batch_buffers import BatchBuffers


def test_an_array_given_back_is_lent_again_for_the_same_shape_and_dtype() -> None:
    pool = BatchBuffers(max_bytes=1 << 20)
    first = pool.take((2, 3, 8, 8), np.dtype(np.float32))
    assert first.shape == (2, 3, 8, 8) and first.flags.c_contiguous
    pool.give(first)
    assert pool.take((2, 3, 8, 8), np.dtype(np.float16)) is not first  # another dtype
    assert pool.take((1, 3, 8, 8), np.dtype(np.float32)) is not first  # another shape
    assert pool.take((2, 3, 8, 8), np.dtype(np.float32)) is first
    assert pool.take((2, 3, 8, 8), np.dtype(np.float32)) is not first  # lent once only


def test_what_would_pass_the_byte_bound_is_dropped() -> None:
    pool = BatchBuffers(max_bytes=3000)
    a, b = (pool.take((1000,), np.dtype(np.uint16)) for _ in range(2))  # 2000 bytes each
    pool.give(a)
    pool.give(b)  # 4000 > 3000: not kept
    assert pool.take((1000,), np.dtype(np.uint16)) is a
    assert pool.take((1000,), np.dtype(np.uint16)) is not b
