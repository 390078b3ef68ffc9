"""Debian's Prometheus scraping a running ``mededge serve``, for the demo.

Starts ``/usr/bin/prometheus`` on a loopback port with a temporary configuration that scrapes the
service's ``/metrics`` every second, waits for the first samples, and reads figures back through
Prometheus' HTTP query API, so the demo shows a number that went through a real scrape.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PROMETHEUS = "/usr/bin/prometheus"


@dataclass
class PrometheusServer:
    """A running Prometheus; stop it with :meth:`stop`."""

    process: subprocess.Popen[bytes]
    url: str

    def query(self, expression: str) -> list[tuple[dict[str, str], float]]:
        """Instant query; each sample's labels and value.

        Raises:
            urllib.error.URLError: Prometheus does not answer.
        """
        address = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(address, timeout=5) as reply:
            body = json.loads(reply.read())
        return [(dict(r["metric"]), float(r["value"][1])) for r in body["data"]["result"]]

    def wait_for(self, expression: str, timeout_s: float) -> list[tuple[dict[str, str], float]]:
        """Poll ``expression`` until it has samples.

        Raises:
            TimeoutError: none within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                samples = self.query(expression)
            except OSError:
                samples = []
            if samples:
                return samples
            time.sleep(0.5)
        raise TimeoutError(f"Prometheus has no samples of {expression} after {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_prometheus(work: Path, metrics_port: int, timeout_s: float = 60.0) -> PrometheusServer:
    """Start Prometheus scraping ``127.0.0.1:metrics_port/metrics`` every second.

    Raises:
        RuntimeError: Prometheus is not installed or did not become ready.
    """
    if shutil.which(PROMETHEUS) is None:
        raise RuntimeError(f"{PROMETHEUS} is not installed (Debian package prometheus)")
    work.mkdir(parents=True, exist_ok=True)
    config = work / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: mededge\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
    port = _free_port()
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=(work / "prometheus.log").open("wb"), stderr=subprocess.STDOUT)
    server = PrometheusServer(process, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited; see {work / 'prometheus.log'}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2):
                return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"prometheus did not become ready; see {work / 'prometheus.log'}")
