"""deploy/ checked by the tools that own the formats: systemd-analyze (the unit), promtool (the
Prometheus config and alert rules, including unit tests of the alerts), bash (install.sh)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "systemd" / "mededge.service"
EXEC = "/opt/mededge/venv/bin/mededge"


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package})")
    return path


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=cwd)


# --- systemd ------------------------------------------------------------------------------------

def _unit_with_stub(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a stub (verify checks the binary exists)."""
    stub = tmp_path / "bin" / "mededge"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "mededge.service"
    text = UNIT.read_text()
    assert EXEC in text
    unit.write_text(text.replace(EXEC, str(stub)))
    return unit


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze", "systemd")
    result = _run(analyze, "verify", str(_unit_with_stub(tmp_path)))
    # verify exits 0 on unknown keys and bad values too; it reports them on stderr.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_hardening_exposure_is_low(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze", "systemd")
    result = _run(analyze, "security", "--offline=yes", "--threshold=30",
                  str(_unit_with_stub(tmp_path)))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_unit_settings() -> None:
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
             if "=" in line and not line.startswith("#")}
    assert lines["Type"] == "notify" and lines["WatchdogSec"]
    assert lines["User"] == "mededge" and lines["ProtectSystem"] == "strict"
    assert lines["ReadWritePaths"] == "/var/lib/mededge"
    assert lines["CapabilityBoundingSet"] == "" and lines["NoNewPrivileges"] == "yes"
    assert lines["PrivateTmp"] == "yes" and lines["ProtectHome"] == "yes"
    assert lines["Restart"] == "on-failure"


def test_install_script_stages_idempotently(tmp_path: Path) -> None:
    script = DEPLOY / "systemd" / "install.sh"
    assert _run("bash", "-n", str(script)).returncode == 0
    for _ in range(2):
        result = _run("bash", str(script), "--destdir", str(tmp_path), "--no-venv")
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "etc/systemd/system/mededge.service").read_text() == UNIT.read_text()
    config = tmp_path / "etc/mededge/mededge.yaml"
    assert config.read_text() == (DEPLOY / "mededge.example.yaml").read_text()
    config.write_text("# the site's own\n")
    assert _run("bash", str(script), "--destdir", str(tmp_path), "--no-venv").returncode == 0
    assert config.read_text() == "# the site's own\n"  # never overwritten
    assert (tmp_path / "var/lib/mededge/models").is_dir()
    bad = _run("bash", str(script), "--destdir", str(tmp_path), "--bogus")
    assert bad.returncode == 2 and "unknown option" in bad.stderr


# --- Prometheus ---------------------------------------------------------------------------------

def test_promtool_check_rules() -> None:
    promtool = _tool("promtool", "prometheus")
    result = _run(promtool, "check", "rules", str(DEPLOY / "compose" / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config() -> None:
    promtool = _tool("promtool", "prometheus")
    result = _run(promtool, "check", "config", str(DEPLOY / "compose" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


ALERT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  # The PACS refuses every delivery for half an hour, then one gives up.
  - interval: 1m
    input_series:
      - series: 'mededge_deliveries_total{{job="mededge",instance="box1",outcome="failed"}}'
        values: '0+1x40'
      - series: 'mededge_deliveries_total{{job="mededge",instance="box1",outcome="dead"}}'
        values: '0x30 1x10'
      - series: 'mededge_spool_free_bytes{{job="mededge",instance="box1"}}'
        values: '100e9x40'
    alert_rule_test:
      - eval_time: 30m
        alertname: MededgePacsUnreachable
        exp_alerts:
          - exp_labels: {{job: mededge, instance: box1, severity: warning}}
      - eval_time: 35m
        alertname: MededgeDeadLetters
        exp_alerts:
          - exp_labels: {{job: mededge, instance: box1, outcome: dead, severity: critical}}
      - eval_time: 30m
        alertname: MededgeSpoolLow
        exp_alerts: []
  # Deliveries that fail and succeed alike: the PACS is reachable.
  - interval: 1m
    input_series:
      - series: 'mededge_deliveries_total{{job="mededge",instance="box1",outcome="failed"}}'
        values: '0+1x40'
      - series: 'mededge_deliveries_total{{job="mededge",instance="box1",outcome="done"}}'
        values: '0+5x40'
      - series: 'mededge_spool_free_bytes{{job="mededge",instance="box1"}}'
        values: '1e9x20'
    alert_rule_test:
      - eval_time: 30m
        alertname: MededgePacsUnreachable
        exp_alerts: []
      - eval_time: 10m
        alertname: MededgeSpoolLow
        exp_alerts:
          - exp_labels: {{job: mededge, instance: box1, severity: warning}}
  # A model that served and then disappeared from the Triton families.
  - interval: 1m
    input_series:
      - series: 'nv_inference_count{{job="mededge",instance="box1",model="seg",version="1"}}'
        values: '0+1x10 _x30'
      - series: 'nv_inference_count{{job="mededge",instance="box1",model="cls",version="1"}}'
        values: '0+1x40'
    alert_rule_test:
      - eval_time: 23m
        alertname: MededgeModelNotReady
        exp_alerts:
          - exp_labels: {{job: mededge, instance: box1, model: seg, severity: critical}}
"""


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    promtool = _tool("promtool", "prometheus")
    # promtool compares annotations too; the tests are about when alerts fire, so drop them.
    rules = yaml.safe_load((DEPLOY / "compose" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(ALERT_TESTS.format(rules=tmp_path / "alerts.yml"))
    result = _run(promtool, "test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
