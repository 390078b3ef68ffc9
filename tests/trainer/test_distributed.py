"""DDP for real: ``torchrun --standalone --nproc-per-node 2`` (gloo on CPU) runs a tiny
``mededge train segment``. Rank 0 alone evaluates and publishes (one version); the two ranks
draw complementary shards of the very draw a one-process run makes (interleaved, they are that
draw), and each takes half the optimizer steps. The weights are not compared with the
one-process run's: with half the steps at twice the effective batch and per-rank batch-norm
statistics they differ, as they should."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge.cli import main as cli
from edge.repository.sidecar import read_sidecar

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
SAMPLES, BATCH = 8, 2
SAMPLER_LINE = re.compile(r"sampler rank (\d)/(\d) epoch 1: ([\d ]+)$", re.MULTILINE)


def train_args(data: Path, root: Path) -> list[str]:
    return ["-v", "train", "segment", "--data", str(data), "--repo", str(root / "repo"),
            "--model", "seg", "--epochs", "1", "--samples-per-epoch", str(SAMPLES),
            "--batch-size", str(BATCH), "--size", "32", "--widths", "4,8", "--no-progress",
            "--no-cache", "--device", "cpu", "--work-dir", str(root / "work")]


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def rank_logs(log_dir: Path) -> dict[int, str]:
    """stdout + stderr of each rank, from torchrun's ``--log-dir``."""
    out: dict[int, str] = {}
    for path in sorted(log_dir.rglob("*.log")):
        rank = int(path.parent.name)
        out[rank] = out.get(rank, "") + path.read_text()
    return out


def shards(text: str) -> dict[int, list[int]]:
    return {int(m[1]): [int(i) for i in m[3].split()] for m in SAMPLER_LINE.finditer(text)}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "data"
    assert cli(["synth", "--out", str(out), "--studies", "3", "--seed", "2", "--size", "64",
                "--slices-min", "8", "--slices-max", "10", "--quiet"]) == 0
    return out


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")
def test_torchrun_two_ranks_train_and_rank_0_publishes(data: Path, tmp_path: Path) -> None:
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    proc = run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--log-dir",
                str(ddp / "logs"), "--redirects", "3", "-m", "edge.cli", *train_args(data, ddp)])
    logs = rank_logs(ddp / "logs")
    assert proc.returncode == 0, (proc.stderr[-3000:], {r: t[-2000:] for r, t in logs.items()})
    assert sorted(logs) == [0, 1]

    # rank 0 alone evaluated and published; exactly one version exists
    assert "seg v1" in logs[0] and "val dice_mean" in logs[0]
    assert "seg v1" not in logs[1] and "val dice_mean" not in logs[1]
    assert sorted(p.name for p in (ddp / "repo" / "seg").iterdir() if p.is_dir()) == ["1"]
    sidecar = read_sidecar(ddp / "repo" / "seg")
    assert sidecar is not None and "dice_lung" in sidecar.versions[1].metrics

    # each rank drew its own half of the epoch
    per_rank = {r: shards(logs[r])[r] for r in (0, 1)}
    assert [len(s) for s in per_rank.values()] == [SAMPLES // 2] * 2
    assert per_rank[0] != per_rank[1]

    # the same run in one process draws exactly the two shards interleaved
    proc = run([sys.executable, "-m", "edge.cli", *train_args(data, single)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (alone,) = shards(proc.stderr).values()
    assert alone[0::2] == per_rank[0] and alone[1::2] == per_rank[1]

    # every DDP step consumed a batch on each rank: half the steps of the one-process run
    steps = {name: torch.load(root / "work" / "last.pt", map_location="cpu",
                              weights_only=False)["scheduler"]["last_epoch"]
             for name, root in (("ddp", ddp), ("single", single))}
    assert steps == {"ddp": SAMPLES // (2 * BATCH), "single": SAMPLES // BATCH}

