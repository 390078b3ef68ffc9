"""The clinical accuracy gate: a converted model is published only when its task metric on
held-out data is within ``tolerance`` of its FP32 source's, both measured in the same run on
the same preprocessed samples; output agreement (top-1, max/mean abs diff) is reported with it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from converters.calibration import SampleSet
from converters.evaluate import Agreement, Runner, agreement, predict, task_metric
from edge.core.errors import MededgeError
from edge.core.types import Task

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.01


class GateError(MededgeError):
    """A converted model lost more accuracy than the tolerance allows; nothing was published."""


@dataclass(frozen=True)
class GateReport:
    """The gate's verdict; ``drop`` = reference - candidate (positive: the candidate is worse)."""

    metric: str
    reference: float
    candidate: float
    tolerance: float
    agreement: Agreement
    samples: int
    data: str
    data_fingerprint: str

    @property
    def drop(self) -> float:
        return self.reference - self.candidate

    @property
    def passed(self) -> bool:
        return math.isfinite(self.candidate) and self.drop <= self.tolerance

    def message(self, what: str) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"accuracy gate {verdict} for {what}: {self.metric} {self.reference:.4f} (FP32) "
                f"-> {self.candidate:.4f}, drop {self.drop:+.4f} (tolerance {self.tolerance:g}) "
                f"on {self.samples} held-out samples; top-1 agreement "
                f"{self.agreement.top1:.4f}, max abs diff {self.agreement.max_abs_diff:.4g}")

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "reference": self.reference,
                "candidate": self.candidate, "drop": self.drop, "tolerance": self.tolerance,
                "passed": self.passed, "samples": self.samples, "data": self.data,
                "data_fingerprint": self.data_fingerprint, **self.agreement.as_dict()}


def evaluate_gate(task: Task, labels: Sequence[str], reference: Runner, candidate: Runner,
                  samples: SampleSet, tolerance: float = DEFAULT_TOLERANCE,
                  batch_size: int = 8, postprocess: Mapping[str, Any] | None = None
                  ) -> GateReport:
    """Run both models on ``samples`` and compare; does not raise on a failed gate.
    ``postprocess``: the sidecar's (how a detector's heads decode).

    Raises:
        DataError: the samples carry no reference for the task metric.
    """
    ref_out = predict(reference, samples, batch_size)
    cand_out = predict(candidate, samples, batch_size)
    metric, ref_value = task_metric(task, ref_out, samples, labels, postprocess)
    _, cand_value = task_metric(task, cand_out, samples, labels, postprocess)
    return GateReport(metric, ref_value, cand_value, tolerance, agreement(ref_out, cand_out),
                      len(samples), samples.source, samples.fingerprint)


def enforce(report: GateReport, what: str) -> None:
    """Log the verdict.

    Raises:
        GateError: the metric dropped by more than the tolerance (the message says by how much).
    """
    text = report.message(what)
    if not report.passed:
        raise GateError(text)
    log.info("%s", text)
