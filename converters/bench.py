"""``mededge bench convert``: INT8 (QDQ) vs FP32 on ONNX Runtime's CPU provider, one run.

For a classifier and a segmenter: the task-metric drop on held-out data (AUC, Dice) and the
throughput ratio, both measured in the same process, FP32 and INT8 alternating round by round,
medians reported. Models: by default a small ResNet-style classifier and a 3-level U-Net
(Conv/BatchNorm/ReLU, the graphs INT8 kernels suit) trained for a few seconds with torch on
generated images (a dark disc and, in half of them, a faint bright blob), so the metrics mean
something; or published models with ``--repo --classifier --segmenter --detector --data``
(a detector is scored on ``map_50`` of its decoded heads, as the accuracy gate scores it).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.calibration import SampleSet
from converters.evaluate import onnx_runner, predict, task_metric
from converters.int8 import Int8Options, quantize_int8
from edge.core.types import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchRow:
    """One model's result."""

    model: str
    metric: str
    fp32: float
    int8: float
    drop: float
    fp32_ips: float
    int8_ips: float
    speedup: float
    int8_kernels: dict[str, int]


def phantoms(n: int, size: int, seed: int) -> SampleSet:
    """Noise, a dark disc ("lung", class 1) and in every other image a faint blob (class 2)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] * (32.0 / size)
    images = rng.normal(0.5, 0.08, (n, 1, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    labels = (np.arange(n) % 2).astype(np.int64)
    for i in range(n):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(6, 10)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        images[i, 0][disc] -= 0.35
        masks[i][disc] = 1
        if labels[i]:
            by, bx = cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3)
            blob = (yy - by) ** 2 + (xx - bx) ** 2 < rng.uniform(1.5, 3) ** 2
            images[i, 0][blob] += rng.uniform(0.05, 0.35)
            masks[i][blob] = 2
    return SampleSet(images, labels, masks, f"phantoms(n={n}, size={size}, seed={seed})")


def _torch_model(task: Task) -> Any:
    from torch import nn

    def cbr(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    if task is Task.CLASSIFY:
        return nn.Sequential(*cbr(1, 32, 2), *cbr(32, 32), *cbr(32, 64, 2), *cbr(64, 64),
                             *cbr(64, 128, 2), *cbr(128, 128), nn.AdaptiveMaxPool2d(1),
                             nn.Flatten(), nn.Linear(128, 2))

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # Base width 32 (as bench serve's U-Net): at width 16 the full-resolution convs are
            # too narrow for int8 GEMMs to beat ORT's NCHWc FP32 kernels (1.5x vs 2.1x here).
            self.e1 = nn.Sequential(*cbr(1, 32), *cbr(32, 32))
            self.e2 = nn.Sequential(*cbr(32, 64, 2), *cbr(64, 64))
            self.b = nn.Sequential(*cbr(64, 128, 2), *cbr(128, 128))
            # Upsample + 3x3 conv rather than ConvTranspose: ONNX Runtime's CPU provider has
            # no quantised ConvTranspose kernel, so it would stay float between QDQ pairs.
            self.u2 = nn.Sequential(nn.Upsample(scale_factor=2), *cbr(128, 64))
            self.d2 = nn.Sequential(*cbr(128, 64))
            self.u1 = nn.Sequential(nn.Upsample(scale_factor=2), *cbr(64, 32))
            self.d1 = nn.Sequential(*cbr(64, 32))
            self.out = nn.Conv2d(32, 3, 1)

        def forward(self, x: Any) -> Any:
            import torch

            e1 = self.e1(x)
            e2 = self.e2(e1)
            d2 = self.d2(torch.cat([self.u2(self.b(e2)), e2], 1))
            return self.out(self.d1(torch.cat([self.u1(d2), e1], 1)))

    return UNet()


def train_and_export(task: Task, size: int, steps: int, path: Path, seed: int = 0) -> Path:
    """Train the bench model for ``steps`` Adam steps and export it (TorchScript exporter).

    Raises:
        ImportError: torch is not installed (``pip install 'mededge[train]'``).
    """
    import torch

    torch.manual_seed(seed)
    data = phantoms(512, size, seed + 1000)
    x = torch.from_numpy(data.images)
    target = data.labels if task is Task.CLASSIFY else data.masks
    assert target is not None  # phantoms() always makes both
    y = torch.from_numpy(target.astype(np.int64))
    model = _torch_model(task)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    torch.onnx.export(model, (x[:1],), str(path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _throughput(run: Callable[[np.ndarray], Any], batch: np.ndarray, seconds: float) -> float:
    run(batch)  # warm
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        run(batch)
        done += len(batch)
    return done / elapsed


def bench_model(name: str, task: Task, labels: tuple[str, ...], fp32: Path,
                calibration: SampleSet, held_out: SampleSet, work: Path, *, rounds: int,
                seconds: float, batch: int, threads: int,
                postprocess: dict[str, Any] | None = None) -> BenchRow:
    """Quantise ``fp32``, then compare metric and throughput (alternating rounds, medians).
    ``postprocess``: a detector's decoding settings (its sidecar's)."""
    int8 = work / f"{name}.int8.onnx"
    details = quantize_int8(fp32, int8, calibration.images, Int8Options())
    heads = task is Task.DETECT
    runners = {"fp32": onnx_runner(str(fp32), threads=threads, all_outputs=heads),
               "int8": onnx_runner(str(int8), threads=threads, all_outputs=heads)}
    metric, ref = task_metric(task, predict(runners["fp32"], held_out), held_out, labels,
                              postprocess)
    _, got = task_metric(task, predict(runners["int8"], held_out), held_out, labels,
                         postprocess)
    x = np.ascontiguousarray(held_out.images[:batch])
    speeds: dict[str, list[float]] = {"fp32": [], "int8": []}
    for r in range(rounds):
        order = ("fp32", "int8") if r % 2 == 0 else ("int8", "fp32")
        for system in order:
            speeds[system].append(_throughput(runners[system], x, seconds))
    fp32_ips, int8_ips = (statistics.median(speeds[s]) for s in ("fp32", "int8"))
    kernels = details["cpu_int8_kernels"]
    return BenchRow(name, metric, ref, got, ref - got, fp32_ips, int8_ips, int8_ips / fp32_ips,
                    dict(kernels) if isinstance(kernels, dict) else {})


def format_table(rows: list[BenchRow]) -> str:
    """The result table, with the targets (speed-up >= 1.8, drop < 0.01) marked."""
    head = (f"{'model':<11}{'metric':<10}{'FP32':>8}{'INT8':>8}{'drop':>9}{'FP32 img/s':>12}"
            f"{'INT8 img/s':>12}{'speed-up':>10}  int8 kernels (ORT CPU)")
    lines = [head, "-" * len(head)]
    for r in rows:
        kernels = ", ".join(f"{k}={v}" for k, v in r.int8_kernels.items())
        lines.append(f"{r.model:<11}{r.metric:<10}{r.fp32:>8.4f}{r.int8:>8.4f}{r.drop:>+9.4f}"
                     f"{r.fp32_ips:>12.1f}{r.int8_ips:>12.1f}{r.speedup:>9.2f}x  {kernels}")
        verdict = [("speed-up >= 1.8x", r.speedup >= 1.8), ("drop < 0.01", r.drop < 0.01)]
        lines.append(" " * 11 + "targets: " + ", ".join(
            f"{n} {'met' if ok else 'NOT met'}" for n, ok in verdict))
    return "\n".join(lines)


def main(work: Path, *, size: int, steps: int, rounds: int, seconds: float, batch: int,
         threads: int, repo: Path | None = None, classifier: str | None = None,
         segmenter: str | None = None, data: Path | None = None,
         detector: str | None = None) -> int:
    """Run the benchmark, print the table, write ``work/bench_convert.json``; returns 0."""
    work.mkdir(parents=True, exist_ok=True)
    cases: list[tuple[str, Task, tuple[str, ...], Path, SampleSet, SampleSet]] = []
    postprocess: dict[str, dict[str, Any]] = {}
    if repo is not None:
        from converters.calibration import load_samples
        from converters.manifest import resolve_source

        for name in (n for n in (classifier, segmenter, detector) if n):
            src = resolve_source(repo, name)
            if data is None:
                raise ValueError("--repo needs --data (held-out and calibration data)")
            spec, labels = src.sidecar.preprocess, src.sidecar.labels
            cal = load_samples(data, spec, split="train", labels=labels, limit=128)
            held = load_samples(data, spec, split="test", labels=labels, task=src.sidecar.task)
            postprocess[name] = dict(src.sidecar.postprocess)
            cases.append((name, src.sidecar.task, labels, src.onnx_path, cal, held))
    else:
        held, cal = phantoms(128, size, 7), phantoms(64, size, 8)
        for name, task, labels in (("classifier", Task.CLASSIFY, ("no_blob", "blob")),
                                   ("segmenter", Task.SEGMENT, ("background", "lung", "blob"))):
            started = time.perf_counter()
            path = train_and_export(task, size, steps, work / f"{name}.onnx")
            log.info("trained %s in %.0f s", name, time.perf_counter() - started)
            cases.append((name, task, labels, path, cal, held))
    rows = [bench_model(name, task, labels, path, cal, held, work, rounds=rounds,
                        seconds=seconds, batch=batch, threads=threads,
                        postprocess=postprocess.get(name))
            for name, task, labels, path, cal, held in cases]
    table = format_table(rows)
    print(table)
    (work / "bench_convert.json").write_text(json.dumps(
        {"rows": [asdict(r) for r in rows], "size": size, "batch": batch, "rounds": rounds,
         "seconds": seconds, "threads": threads}, indent=1))
    return 0
