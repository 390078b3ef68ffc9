"""``mededge bench detect``: a published detector's throughput, raw ONNX Runtime vs through the
scheduler (same session options, same machine, same run), and the sliding-window overhead
(cutting, padding, Gaussian blending of all three heads) over the raw tile compute.

Images are real-looking noise at the model's input size; for the sliding window a slice twice
the model's size on each side (e.g. 512 x 512 for a 256 x 256 detector: 9 windows at 25 %
overlap). The overhead is the fixed cost of a call (the whole call minus a raw run of the same
pre-cut batches through the same scheduler, paired and interleaved, median over the pairs) as a
share of the median raw run. Ratios, not absolute times, are the result: this CPU is shared, so
the load average is printed with them.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from edge.core.config import load_settings
from edge.core.types import InferenceRequest
from edge.postprocess.slice_boxes import decode_spec
from edge.postprocess.sliding_window import WindowSpec, measure_overhead
from edge.repository.loader import read_model
from edge.scheduler.loading import load_version


def _raw(path: Path, x: np.ndarray, seconds: float) -> float:
    from edge.tools.bench_serve import session

    # the served backend's session options (threads, spinning off), so only serving differs
    sess = session(path, os.cpu_count() or 1)
    sess.run(None, {"image": x})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sess.run(None, {"image": x})
        n += 1
    return n / (time.perf_counter() - start)


def _served(model: Any, x: np.ndarray, seconds: float, in_flight: int = 4) -> float:
    def submit() -> Future[Any]:
        return model.submit(InferenceRequest(model=model.id.name, version=model.id.version,
                                             inputs={"image": x}))
    submit().result()
    n, start, pending = 0, time.perf_counter(), deque[Future[Any]]()
    while time.perf_counter() - start < seconds:
        pending.append(submit())
        if len(pending) >= in_flight:
            pending.popleft().result()
            n += 1
    for future in pending:
        future.result()
        n += 1
    return n / (time.perf_counter() - start)


def main(repo: Path, name: str, seconds: float = 5.0, rounds: int = 3,
         out: Path | None = None) -> int:
    """Print the table (and write ``out`` JSON when given). Returns the exit code."""
    settings = load_settings(overrides={"server": {"model_repository": str(repo)}}, environ={})
    source = read_model(repo, name)
    model = load_version(source, source.versions[-1], settings)
    try:
        sidecar = model.sidecar
        if sidecar is None or sidecar.task.value != "detect":
            print(f"mededge bench detect: {name} is not a detector (sidecar task detect)")
            return 2
        spec = sidecar.preprocess
        x = np.random.default_rng(0).normal(0, 1, (1, spec.channels, spec.height, spec.width))
        x = x.astype(np.float32)
        path = repo / name / str(model.id.version) / "model.onnx"
        raw, via = [], []
        for _ in range(max(1, rounds)):  # interleaved, medians reported
            raw.append(_raw(path, x, seconds))
            via.append(_served(model, x, seconds))
        stride = decode_spec(sidecar.postprocess).stride
        window = WindowSpec(size=(spec.height, spec.width), overlap=0.25, output_stride=stride)
        big = np.random.default_rng(1).normal(
            0, 1, (spec.channels, 2 * spec.height, 2 * spec.width))
        # one slice takes milliseconds: many blocks, so that their median is the fixed cost
        load = os.getloadavg()[0]
        overhead = measure_overhead(big.astype(np.float32), model, window,
                                    blocks=max(10, 2 * rounds), per_block=10, pairs=100)
        load = max(load, os.getloadavg()[0])
    finally:
        model.close()
    result: dict[str, Any] = {"model": str(model.id), "input": [spec.height, spec.width],
              "raw_img_s": float(np.median(raw)), "scheduler_img_s": float(np.median(via)),
              "scheduler_vs_raw": float(np.median(via) / np.median(raw)),
              "sliding_tiles": overhead.tiles, "sliding_batches": list(overhead.batches),
              "sliding_blocks": overhead.blocks, "sliding_per_block": overhead.per_block,
              "sliding_pairs": overhead.pairs, "sliding_s": overhead.sliding_s,
              "sliding_median_s": overhead.sliding_median_s,
              "sliding_raw_s": overhead.raw_s, "sliding_raw_median_s": overhead.raw_median_s,
              "sliding_fixed_s": overhead.fixed_s, "sliding_overhead": overhead.fraction,
              "sliding_fixed_alternating_s": overhead.fixed_alternating_s,
              "sliding_overhead_alternating": overhead.alternating_fraction,
              "sliding_overhead_best": overhead.best_fraction, "load_average_1m": load}
    print(f"detector {result['model']} at {spec.height}x{spec.width}, batch 1, "
          f"medians of {rounds} rounds of {seconds:g} s")
    print(f"  raw ONNX Runtime   {result['raw_img_s']:8.1f} img/s")
    print(f"  via the scheduler  {result['scheduler_img_s']:8.1f} img/s "
          f"({100 * result['scheduler_vs_raw']:.1f} % of raw)")
    batches = " + ".join(map(str, overhead.batches))
    print(f"  sliding window on {2 * spec.height}x{2 * spec.width}: {overhead.tiles} tiles in "
          f"batches of {batches}, {overhead.blocks} pairs of blocks of {overhead.per_block} "
          f"calls (load average {load:.2f})")
    print(f"    raw pre-cut tiles  median {overhead.raw_median_s * 1e3:6.2f} ms, "
          f"best {overhead.raw_s * 1e3:6.2f} ms")
    print(f"    whole call         median {overhead.sliding_median_s * 1e3:6.2f} ms, "
          f"best {overhead.sliding_s * 1e3:6.2f} ms ({100 * overhead.best_fraction:+.1f} % "
          f"best vs best)")
    print(f"    overhead {100 * overhead.fraction:+.1f} % (target < 10 %): fixed cost "
          f"{overhead.fixed_s * 1e3:.2f} ms per slice, slice after slice (the median over the "
          f"block pairs of the whole call minus the raw tiles)")
    print(f"    each call right after the other kind ({overhead.pairs} alternating pairs): "
          f"{100 * overhead.alternating_fraction:+.1f} %, "
          f"{overhead.fixed_alternating_s * 1e3:.2f} ms")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return 0
