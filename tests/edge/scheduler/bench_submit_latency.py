"""Batch-1 latency that ServedModel.submit adds to a raw ``InferenceSession.run``, when idle.

Run: ``.venv/bin/python tests/edge/scheduler/bench_submit_latency.py [--n 3000]``.
Prints medians and p90s of both paths, measured interleaved in the same process on the same
model file with the same session options, and the difference. Not a test: numbers, no asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_factory import add_scale_config, conv_net, served, write_add_scale_repo  # noqa: E402

from edge.core.types import InferenceRequest  # noqa: E402

CONV_CONFIG = """
backend: "onnxruntime" max_batch_size: 8
input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 16, 16 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 3 ] } ]
dynamic_batching { }
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def bench(repo: Path, name: str, feed: dict[str, np.ndarray], n: int) -> None:
    model = served(repo, name)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), so,
                                   providers=["CPUExecutionProvider"])
    request = InferenceRequest(name, feed)
    raw: list[float] = []
    ours: list[float] = []
    for _ in range(200):
        session.run(None, feed)
        model.submit(request).result()
    for _ in range(n):
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        t1 = time.perf_counter_ns()
        model.submit(request).result()
        t2 = time.perf_counter_ns()
        raw.append((t1 - t0) / 1e3)
        ours.append((t2 - t1) / 1e3)
    model.close(5)
    med_raw, med_ours = statistics.median(raw), statistics.median(ours)
    print(f"{name:10s} raw run  median {med_raw:8.1f} us  p90 {_pct(raw, 0.9):8.1f} us")
    print(f"{name:10s} submit   median {med_ours:8.1f} us  p90 {_pct(ours, 0.9):8.1f} us"
          f"  -> overhead median {med_ours - med_raw:+.1f} us,"
          f" p90 {_pct(ours, 0.9) - _pct(raw, 0.9):+.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        write_add_scale_repo(repo, "add", config=add_scale_config(
            "add", 8, extra="dynamic_batching { }"))
        bench(repo, "add", {"INPUT0": np.ones((1, 4), np.float32)}, args.n)
        conv_net(repo / "conv" / "1" / "model.onnx")
        (repo / "conv" / "config.pbtxt").write_text(CONV_CONFIG)
        bench(repo, "conv", {"image": np.ones((1, 1, 16, 16), np.float32)}, args.n)


if __name__ == "__main__":
    main()
