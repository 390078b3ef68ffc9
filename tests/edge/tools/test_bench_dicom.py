"""``mededge bench dicom`` with tiny numbers: the table has positive rows for each receiver."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge.tools import bench_command, bench_dicom

pytestmark = pytest.mark.skipif(not Path("/usr/bin/storescp").exists(),
                                reason="dcmtk is not installed")


def test_bench_dicom_writes_a_table_with_positive_numbers(tmp_path: Path, capsys) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    bench_command.add_arguments(parser)
    args = parser.parse_args(["dicom", "--work", str(tmp_path), "--images", "20", "--size", "64",
                              "--rounds", "1", "--systems", "storescp,mededge", "--streams", "1"])
    assert bench_command.run(args) == 0
    text = (tmp_path / "bench_dicom.md").read_text()
    assert text in capsys.readouterr().out
    rows = re.findall(r"^\| (storescp|mededge) \| 1 \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", text,
                      re.MULTILINE)
    assert [r[0] for r in rows] == ["storescp", "mededge"]
    assert all(float(row[1]) > 0 for row in rows)  # images/s
    # CPU comes in clock ticks (10 ms): storescp's few ms over 20 tiny images may read 0
    assert float(rows[1][2]) > 0 and float(rows[0][2]) >= 0


def test_summary_is_the_median_with_the_storescp_ratio() -> None:
    results = [bench_dicom.Measurement("storescp", 1, rate, 1.0) for rate in (100, 300, 200)]
    results += [bench_dicom.Measurement("mededge", 1, rate, cpu)
                for rate, cpu in ((50, 4.0), (150, 6.0), (100, 5.0))]
    rows = bench_dicom.summarise(results)
    assert [(r.system, r.images_per_s, r.cpu_ms_per_image, r.vs_storescp) for r in rows] == [
        ("storescp", 200, 1.0, 1.0), ("mededge", 100, 5.0, 0.5)]
