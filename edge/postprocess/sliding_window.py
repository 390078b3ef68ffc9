"""Sliding-window inference for inputs larger than a model's window, 2D or 3D, in numpy.

The image (channels first, no batch axis) is cut into windows that overlap by at least
``overlap`` of the window on each axis, the windows go through the scheduler in batches of up to
the model's ``max_batch_size`` (several batches in flight, so they are batched like any other
request), and the outputs are blended with a Gaussian importance map (centre weight 1, sigma =
``sigma_scale`` x window, as nnU-Net does) so that window borders, where a convolutional model
sees least context, count least and no seams show. A constant model gives the constant back.

Window starts are spread evenly from 0 to ``size - window`` (nnU-Net), so the last window ends
at the border and the real overlap is at least the one asked for. An axis shorter than the
window is padded (``pad_mode``) and the output cropped back. Models whose output is smaller than
their input by an integer ``output_stride`` (a detector's heads at stride 4) are supported: the
starts are then multiples of the stride and the map has ``ceil(size / stride)`` cells per axis.

Cost. Everything that does not depend on the pixels (window slices, output cells, the
importance map and the reciprocal of the summed weights) is planned once per (shape, window,
batch) and cached; all outputs are blended in one array, so blending is one weighted add per
window and one multiply at the end. Each batch is cut with one copy per window into a
contiguous array lent from the plan's :class:`BatchBuffers` and taken back once its results are
in (fresh pages would be faulted and zeroed for every slice). The first batch is a single
window, the rest as even as the batch limit allows (9 windows at most 8 a batch go as 1 + 8):
the model starts after one window's cut while the others are cut (the batches are sent
``no_delay``, so the lone first window does not wait the model's queue delay for company).
Windows are cut channel plane by channel plane, so the rows they share come from the cache.
Cutting (a copy of every window, memory-bound, 11.8 MB for a 5-channel 512² slice) is then most
of the fixed cost; where the model keeps every core busy (ONNX Runtime on a CPU) it is not
hidden but paid in full.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.core.types import InferenceRequest, InferenceResponse
from edge.postprocess.batch_buffers import BatchBuffers
from edge.scheduler.model import ServedModel

TileSubmit = Callable[[np.ndarray], "Future[Any]"]
"""``submit(batch)``: a batch ``(B, C, *window)`` -> a future of the model's outputs for it, as an
array, a mapping of output name to array, or an :class:`InferenceResponse`. The batch is lent:
once the future is done it is reused for a later batch, so keep a copy to keep it."""


@dataclass(frozen=True)
class WindowSpec:
    """How to tile: window size per spatial axis (2 or 3), overlap in [0, 1), blending.

    ``max_batch`` 0 takes the model's ``max_batch_size`` (1 for a plain callable).
    ``max_in_flight`` bounds the batches queued at once (memory and the scheduler's queue bound).
    """

    size: tuple[int, ...]
    overlap: float = 0.25
    blend: str = "gaussian"  # or "constant"
    sigma_scale: float = 0.125
    pad_mode: str = "constant"  # numpy.pad mode for axes shorter than the window
    pad_value: float = 0.0
    output_stride: int = 1
    max_batch: int = 0
    max_in_flight: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if len(self.size) not in (2, 3) or min(self.size) <= 0:
            raise ValueError(f"WindowSpec.size must be 2 or 3 positive ints, got {self.size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"WindowSpec.overlap must lie in [0, 1), got {self.overlap}")
        if self.blend not in ("gaussian", "constant"):
            raise ValueError(f"WindowSpec.blend must be gaussian or constant, got {self.blend!r}")
        if self.sigma_scale <= 0 or self.output_stride < 1 or self.max_in_flight < 1:
            raise ValueError("WindowSpec: sigma_scale, output_stride and max_in_flight must be "
                             "positive")
        if any(s % self.output_stride for s in self.size):
            raise ValueError(f"WindowSpec.size {self.size} is not a multiple of output_stride "
                             f"{self.output_stride}")


def window_starts(length: int, window: int, overlap: float, stride: int = 1) -> list[int]:
    """Start offsets along one axis (``length >= window``), evenly spread, multiples of
    ``stride`` when ``length - window`` is one.

    Raises:
        ValueError: ``length`` is shorter than ``window``.
    """
    if length < window:
        raise ValueError(f"window_starts: axis of {length} is shorter than the window {window}")
    span = length - window
    if span == 0:
        return [0]
    step = max(1.0, window * (1.0 - overlap))
    count = math.ceil(span / step) + 1
    starts = [round(i * span / (count - 1) / stride) * stride for i in range(count)]
    return sorted(set(min(s, span) for s in starts))


def importance_map(size: Sequence[int], blend: str = "gaussian",
                   sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weights of one window, float32, max 1, strictly positive (read-only, cached)."""
    return _importance_map(tuple(int(n) for n in size), blend, float(sigma_scale))


@functools.lru_cache(maxsize=16)
def _importance_map(size: tuple[int, ...], blend: str, sigma_scale: float) -> np.ndarray:
    if blend == "constant":
        weights = np.ones(size, np.float32)
        weights.flags.writeable = False
        return weights
    weights = np.ones((), np.float64)
    for n in size:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        g = np.exp(-0.5 * (x / (sigma_scale * n)) ** 2)
        weights = np.multiply.outer(weights, g)
    weights /= weights.max()
    out = np.maximum(weights, 1e-6).astype(np.float32)
    out.flags.writeable = False
    return out


def served_submit(model: ServedModel, input_name: str | None = None, priority: int = 0,
                  deadline: float | None = None) -> TileSubmit:
    """A :data:`TileSubmit` that sends each batch to ``model`` as one request, marked
    ``no_delay``: the batches are sized already, and the first (one window, so that the model
    starts early) would otherwise wait the model's queue delay for the next.

    Raises:
        ValueError: the model has several inputs and ``input_name`` is not given.
    """
    if input_name is None:
        if len(model.inputs) != 1:
            raise ValueError(f"{model.id}: {len(model.inputs)} inputs; name the image input")
        input_name = model.inputs[0].name
    name = input_name

    def submit(batch: np.ndarray) -> Future[InferenceResponse]:
        return model.submit(InferenceRequest(model.id.name, {name: batch},
                                             version=model.id.version, priority=priority,
                                             deadline=deadline, no_delay=True))

    return submit


def _runner(model: ServedModel | TileSubmit, window: WindowSpec) -> tuple[TileSubmit, int]:
    if isinstance(model, ServedModel):
        limit = model.max_batch_size if model.max_batch_size > 0 else 1
        return served_submit(model), window.max_batch or limit
    return model, window.max_batch or 1


def _outputs(result: Any) -> Mapping[str, np.ndarray]:
    if isinstance(result, InferenceResponse):
        return result.outputs
    if isinstance(result, Mapping):
        return result
    return {"": np.asarray(result)}


def _pad(image: np.ndarray, window: WindowSpec) -> tuple[np.ndarray, tuple[int, ...]]:
    """Pad short axes to the window (centred) and every axis to a multiple of the stride."""
    spatial = image.shape[1:]
    s = window.output_stride
    target = [max(n, w) for n, w in zip(spatial, window.size, strict=True)]
    target = [math.ceil(n / s) * s for n in target]
    before = [(t - n) // 2 // s * s for t, n in zip(target, spatial, strict=True)]
    if list(spatial) == target:
        return image, tuple(before)
    widths = [(0, 0)] + [(b, t - n - b) for b, t, n in zip(before, target, spatial, strict=True)]
    kwargs: dict[str, Any] = {"constant_values": window.pad_value} \
        if window.pad_mode == "constant" else {}
    mode: Any = window.pad_mode  # numpy's stubs want a Literal
    return np.pad(image, widths, mode=mode, **kwargs), tuple(before)


def tile_origins(shape: Sequence[int], window: WindowSpec) -> list[tuple[int, ...]]:
    """Every window's origin over a (padded) spatial ``shape``, in C order."""
    per_axis = [window_starts(n, w, window.overlap, window.output_stride)
                for n, w in zip(shape, window.size, strict=True)]
    return list(itertools.product(*per_axis))


def batch_sizes(tiles: int, limit: int) -> list[int]:
    """How ``tiles`` windows are batched: one window first, so the model starts after one
    window's cut, then the rest in as few batches as ``limit`` allows, sizes differing by at
    most one, smaller first (``batch_sizes(9, 8) == [1, 8]``, ``batch_sizes(9, 4) == [1, 4,
    4]``)."""
    if tiles <= 1:
        return [tiles] if tiles else []
    rest = tiles - 1
    count = math.ceil(rest / max(1, limit))
    base, extra = divmod(rest, count)
    return [1] + [base] * (count - extra) + [base + 1] * extra


@dataclass(frozen=True)
class _TilePlan:
    """What tiling one padded shape needs besides the pixels; read-only arrays."""

    size: tuple[int, ...]  # the window, in input pixels
    out_window: tuple[int, ...]  # the window, in output cells
    grid: tuple[int, ...]  # the padded shape, in output cells
    cuts: tuple[tuple[slice, ...], ...]  # each window in the padded image (all channels)
    cells: tuple[tuple[slice, ...], ...]  # each window's cells in a (C_out, *grid) map
    batches: tuple[range, ...]  # the windows of each batch, in submission order
    weights: np.ndarray  # importance map of one window's output
    inverse: np.ndarray  # 1 / (sum of every window's weights) per cell of the grid
    buffers: BatchBuffers  # batch arrays, reused by the calls with this plan


#: Batch arrays kept per plan for reuse (the 2.5D detector's 512² slice needs 12 MB).
_POOLED_BYTES = 32 << 20

#: Plans with a grid up to this many cells are cached, 4 at most (a 512² slice at stride 4 has
#: 16 Ki cells; the normaliser takes 4 bytes a cell), so at most 4 x 32 MB of batch arrays are
#: kept; larger grids, 3D volumes, are planned per call (their arrays are still reused within
#: the call), where the compute dwarfs the planning. Besides the :class:`BatchBuffers` scratch
#: memory (see there) the cache holds only read-only values, like :func:`importance_map`'s.
_CACHED_CELLS = 1 << 20


def _tile_plan(shape: tuple[int, ...], window: WindowSpec, batch: int) -> _TilePlan:
    grid = tuple(n // window.output_stride for n in shape)
    if math.prod(grid) <= _CACHED_CELLS:
        return _cached_tile_plan(shape, window, batch)
    return _make_tile_plan(shape, window, batch)


def _make_tile_plan(shape: tuple[int, ...], window: WindowSpec, batch: int) -> _TilePlan:
    s = window.output_stride
    out_window = tuple(w // s for w in window.size)
    grid = tuple(n // s for n in shape)
    origins = tile_origins(shape, window)
    cuts = tuple((slice(None),) + tuple(slice(o, o + w) for o, w in
                                        zip(origin, window.size, strict=True))
                 for origin in origins)
    cells = tuple((slice(None),) + tuple(slice(o // s, o // s + w) for o, w in
                                         zip(origin, out_window, strict=True))
                  for origin in origins)
    weights = importance_map(out_window, window.blend, window.sigma_scale)
    total = np.zeros(grid, np.float32)
    for region in cells:
        total[region[1:]] += weights
    inverse = np.reciprocal(total, out=total)  # weights are >= 1e-6: no zeros
    inverse.flags.writeable = False
    starts = list(itertools.accumulate(batch_sizes(len(origins), batch), initial=0))
    batches = tuple(range(a, b) for a, b in itertools.pairwise(starts))
    return _TilePlan(window.size, out_window, grid, cuts, cells, batches, weights, inverse,
                     BatchBuffers(_POOLED_BYTES))


_cached_tile_plan = functools.lru_cache(maxsize=4)(_make_tile_plan)


def _cut(image: np.ndarray, plan: _TilePlan, tiles: range) -> np.ndarray:
    """The windows ``tiles`` of the padded ``image`` as one contiguous ``(B, C, *size)`` batch
    (from ``plan.buffers``), each copied once.

    Channel by channel: the windows of one channel plane overlap, so after the first window
    the source rows come from the core's cache (a 5-channel 512² slice in cache: 0.7 ms for 9
    windows, the speed of a plain copy of as many bytes, against 1.1 ms window by window;
    right after the model ran, with the image out of cache, both take about 2 ms)."""
    batch = plan.buffers.take((len(tiles), image.shape[0]) + plan.size, image.dtype)
    for channel, plane in enumerate(image):
        for k, tile in enumerate(tiles):
            np.copyto(batch[k, channel], plane[plan.cuts[tile][1:]])
    return batch


class _Blend:
    """The running Gaussian-weighted sum of a model's outputs over the grid: every output in one
    float32 ``(C_total, *grid)`` array, so each window is one weighted add whatever the number
    of outputs (a detector's three heads), and the normalisation one multiply at the end."""

    def __init__(self, plan: _TilePlan, outputs: Sequence[str] | None) -> None:
        self._plan = plan
        self._wanted = None if outputs is None else tuple(outputs)
        self._channels: dict[str, slice] = {}
        self._sum: np.ndarray | None = None

    def add(self, result: Any, tiles: range) -> None:
        """Weight the outputs of the windows ``tiles`` and add them in their cells.

        Raises:
            ValueError: an output is not ``(len(tiles), C, *window / stride)``, or its channel
                count changed from the first batch's.
        """
        plan = self._plan
        named = _outputs(result)
        wanted = self._wanted if self._wanted is not None else tuple(named)
        heads = [named[name] for name in wanted]
        for name, out in zip(wanted, heads, strict=True):
            if out.ndim != len(plan.size) + 2 or out.shape[0] != len(tiles) \
                    or out.shape[2:] != plan.out_window:
                raise ValueError(f"sliding window: output {name!r} has shape {out.shape}, "
                                 f"expected ({len(tiles)}, C, "
                                 f"{', '.join(map(str, plan.out_window))})")
        if self._sum is None:
            bounds = list(itertools.accumulate((out.shape[1] for out in heads), initial=0))
            self._channels = {name: slice(a, b) for name, a, b in
                              zip(wanted, bounds[:-1], bounds[1:], strict=True)}
            self._sum = np.zeros((bounds[-1],) + plan.grid, np.float32)
        window = plan.buffers.take((self._sum.shape[0],) + plan.out_window,
                                   np.dtype(np.float32))
        for name, out in zip(wanted, heads, strict=True):
            channels = self._channels[name]
            if out.shape[1] != channels.stop - channels.start:
                raise ValueError(f"sliding window: output {name!r} has {out.shape[1]} channels, "
                                 f"{channels.stop - channels.start} in the first batch")
        for k, tile in enumerate(tiles):  # window by window: the weighted copy stays in cache
            for name, out in zip(wanted, heads, strict=True):
                np.multiply(out[k], plan.weights, out=window[self._channels[name]])
            cells = self._sum[plan.cells[tile]]
            np.add(cells, window, out=cells)
        plan.buffers.give(window)

    def maps(self, crop: tuple[slice, ...]) -> dict[str, np.ndarray]:
        """Each output's blended map over the cells ``crop`` (views of one array)."""
        if self._sum is None:
            return {}
        blended = self._sum[(slice(None),) + crop]
        np.multiply(blended, self._plan.inverse[crop], out=blended)
        return {name: blended[channels] for name, channels in self._channels.items()}


def sliding_window_outputs(image: np.ndarray, model: ServedModel | TileSubmit,
                           window: WindowSpec,
                           outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Blend every output of a dense model over ``image`` ``(C, *spatial)``.

    Returns ``{name: (C_out, *ceil(spatial / stride))}`` float32 for ``outputs`` (default: all;
    a plain callable returning an array gives the key ``""``).

    Raises:
        ValueError: ``image`` does not have 1 + len(window.size) axes, or an output's shape is
            not ``(B, C_out, *window / stride)``.
        Whatever the model raises (QueueFullError, DeadlineExceededError, BackendError ...): the
            remaining batches are cancelled.
    """
    dims = len(window.size)
    if image.ndim != dims + 1:
        raise ValueError(f"sliding window: expected (C, {dims} spatial axes), got {image.shape}")
    submit, batch = _runner(model, window)
    padded, before = _pad(image, window)
    plan = _tile_plan(padded.shape[1:], window, batch)
    blend = _Blend(plan, outputs)
    in_flight: deque[tuple[range, np.ndarray, Future[Any]]] = deque()

    def collect() -> None:
        tiles, lent, future = in_flight.popleft()
        blend.add(future.result(), tiles)
        plan.buffers.give(lent)  # the model is done with it (not on failure: it may not be)

    try:
        for tiles in plan.batches:  # the next batch is cut while the previous ones compute
            batch_array = _cut(padded, plan, tiles)
            in_flight.append((tiles, batch_array, submit(batch_array)))
            if len(in_flight) >= window.max_in_flight:
                collect()
        while in_flight:
            collect()
    finally:
        for _, _, future in in_flight:
            future.cancel()
    s = window.output_stride
    return blend.maps(tuple(slice(b // s, b // s + math.ceil(n / s))
                            for b, n in zip(before, image.shape[1:], strict=True)))


def sliding_window_inference(image: np.ndarray, model: ServedModel | TileSubmit,
                             window: WindowSpec, output: str | None = None) -> np.ndarray:
    """The blended map ``(C_out, *spatial / stride)`` of one output (the only one, or
    ``output``). Raises as :func:`sliding_window_outputs`, and ValueError when the model has
    several outputs and ``output`` is not named."""
    maps = sliding_window_outputs(image, model, window, None if output is None else (output,))
    if len(maps) != 1:
        raise ValueError(f"sliding window: outputs {sorted(maps)}; name one")
    return next(iter(maps.values()))


@dataclass(frozen=True)
class Overhead:
    """Sliding-window time vs the same tile batches sent raw (seconds).

    Two ways of interleaving, both reported:

    - *blocks* (the figure that counts): ``blocks`` pairs of blocks, each block ``per_block``
      calls of one kind in a row after one untimed call, the order alternating. A block is how
      the sliding window runs in service, slice after slice of a series, and the pairing takes
      the host's drift out as the serving bench's paired blocks do. ``fixed_s`` is the median
      over the block pairs of (sliding block median - raw block median).
    - *alternating* single calls (``pairs`` of them): each call right after a call of the other
      kind, so each starts with the caches holding the other's data (the raw run's batches,
      the sliding call's image and lent batch arrays). Worst case, not a state of service.
    """

    tiles: int
    batches: tuple[int, ...]  # the batch sizes, in submission order
    blocks: int
    per_block: int
    pairs: int
    sliding_s: float  # best whole call
    raw_s: float  # best raw run of the pre-cut batches
    raw_median_s: float  # median of the raw blocks' medians
    sliding_median_s: float  # median of the sliding blocks' medians
    fixed_s: float  # steady state: median over the block pairs of the difference of medians
    fixed_alternating_s: float  # median over the alternating pairs of (whole call - raw run)

    @property
    def fraction(self) -> float:
        """``fixed_s / raw_median_s``: cutting, padding and blending over the raw compute."""
        return self.fixed_s / self.raw_median_s

    @property
    def alternating_fraction(self) -> float:
        """``fixed_alternating_s / raw_median_s``."""
        return self.fixed_alternating_s / self.raw_median_s

    @property
    def best_fraction(self) -> float:
        """``sliding_s / raw_s - 1``, best against best."""
        return self.sliding_s / self.raw_s - 1.0


def measure_overhead(image: np.ndarray, model: ServedModel | TileSubmit, window: WindowSpec,
                     blocks: int = 10, per_block: int = 10, pairs: int = 30) -> Overhead:
    """Time :func:`sliding_window_outputs` against submitting its pre-cut batches the same way
    (same batches, same number in flight) and only waiting for the results, in blocks and in
    alternating single calls (see :class:`Overhead`), after one untimed call of each."""
    submit, batch = _runner(model, window)
    padded, _ = _pad(image, window)
    plan = _tile_plan(padded.shape[1:], window, batch)
    batches = [_cut(padded, plan, tiles) for tiles in plan.batches]

    def raw() -> float:
        start = time.perf_counter()
        in_flight: deque[Future[Any]] = deque()
        for tiles in batches:
            in_flight.append(submit(tiles))
            if len(in_flight) >= window.max_in_flight:
                in_flight.popleft().result()
        for future in in_flight:
            future.result()
        return time.perf_counter() - start

    def sliding() -> float:
        start = time.perf_counter()
        sliding_window_outputs(image, model, window)
        return time.perf_counter() - start

    raw()  # warm-up
    sliding()
    every: dict[Callable[[], float], list[float]] = {raw: [], sliding: []}
    medians: dict[Callable[[], float], list[float]] = {raw: [], sliding: []}
    for block in range(max(1, blocks)):
        for kind in ((raw, sliding) if block % 2 == 0 else (sliding, raw)):
            kind()  # the first call of a block follows the other kind: not timed
            times = [kind() for _ in range(max(1, per_block))]
            every[kind] += times
            medians[kind].append(statistics.median(times))
    differences = []
    for repeat in range(max(1, pairs)):
        order = (sliding, raw) if repeat % 2 else (raw, sliding)
        first, second = order[0](), order[1]()
        every[order[0]].append(first)
        every[order[1]].append(second)
        differences.append(first - second if order[0] is sliding else second - first)
    return Overhead(tiles=len(plan.cuts), batches=tuple(len(t) for t in plan.batches),
                    blocks=len(medians[raw]), per_block=max(1, per_block),
                    pairs=len(differences), sliding_s=min(every[sliding]),
                    raw_s=min(every[raw]), raw_median_s=statistics.median(medians[raw]),
                    sliding_median_s=statistics.median(medians[sliding]),
                    fixed_s=statistics.median(s - r for s, r in
                                              zip(medians[sliding], medians[raw], strict=True)),
                    fixed_alternating_s=statistics.median(differences))
