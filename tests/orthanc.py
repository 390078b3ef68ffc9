"""A real Orthanc for tests: loopback, ephemeral ports, its own config and storage, no plugins.

    with Orthanc.start(tmp_dir) as pacs:
        ... C-STORE to ("127.0.0.1", pacs.dicom_port), called AE pacs.aet ...
        pacs.instances()   # REST: ids of stored instances

Stopped by its own PID (SIGTERM, then SIGKILL). ``TCP_NODELAY=1`` is set in its environment:
without it Orthanc's DICOM side manages about 20 images/s over loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC = Path("/usr/sbin/Orthanc")


def free_port() -> int:
    """A port nothing listens on right now (the OS's pick; tiny race until it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc process; ``stop()`` (or leaving the ``with``) ends it."""

    process: subprocess.Popen[bytes]
    dicom_port: int
    http_port: int
    aet: str
    directory: Path
    _log: Any = field(default=None, repr=False)

    @classmethod
    def start(cls, directory: Path, *, aet: str = "ORTHANC", dicom_port: int | None = None,
              timeout_s: float = 30.0, **config: Any) -> Orthanc:
        """Write a config into ``directory``, start Orthanc and wait until its REST API answers.

        Extra keyword arguments are Orthanc configuration options (override the defaults).

        Raises:
            RuntimeError: Orthanc exited or did not answer within ``timeout_s`` (its log is
                quoted).
        """
        directory.mkdir(parents=True, exist_ok=True)
        dicom_port = dicom_port or free_port()
        http_port = free_port()
        settings = {
            "Name": "mededge-test", "DicomAet": aet, "DicomPort": dicom_port,
            "HttpPort": http_port, "StorageDirectory": str(directory / "storage"),
            "IndexDirectory": str(directory / "index"), "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "UnknownSopClassAccepted": False,
            "OverwriteInstances": True, "StorageCompression": False, "Plugins": [],
            "SaveJobs": False, "HttpThreadsCount": 4, "DicomThreadsCount": 2,
            "DicomModalities": {}, "OrthancPeers": {}, "ConcurrentJobs": 1, "StableAge": 1,
            **config,
        }
        path = directory / "orthanc.json"
        path.write_text(json.dumps(settings, indent=2))
        log = (directory / "orthanc.log").open("wb")
        process = subprocess.Popen([str(ORTHANC), str(path)], stdout=log,
                                   stderr=subprocess.STDOUT, cwd=directory,
                                   env={**os.environ, "TCP_NODELAY": "1"},
                                   start_new_session=True)
        server = cls(process, dicom_port, http_port, aet, directory, log)
        try:
            server._wait_ready(timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        raise RuntimeError(f"Orthanc not ready after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return (self.directory / "orthanc.log").read_text(errors="replace")[-chars:]

    # -- REST ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        """GET a REST path; the decoded JSON (or text for non-JSON answers).

        Raises: urllib.error.HTTPError (e.g. 404 for an unknown id), URLError.
        """
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            body = response.read()
            kind = response.headers.get("Content-Type", "")
        return json.loads(body) if "json" in kind else body.decode()

    def delete(self, path: str) -> None:
        request = urllib.request.Request(self.url + path, method="DELETE")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.get("/instances"))

    def series(self) -> list[str]:
        return list(self.get("/series"))

    def tags(self, instance_id: str) -> dict[str, Any]:
        """An instance's tags by keyword (``?simplify``)."""
        return dict(self.get(f"/instances/{instance_id}/tags?simplify"))

    def transfer_syntax(self, instance_id: str) -> str:
        """The transfer syntax UID the instance was received (and stored) in."""
        return str(self.get(f"/instances/{instance_id}/metadata/TransferSyntax")).strip()

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """The Orthanc id of the instance with this SOP Instance UID, None if absent."""
        request = urllib.request.Request(
            self.url + "/tools/lookup", data=sop_instance_uid.encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            found = json.loads(response.read())
        ids = [f["ID"] for f in found if f.get("Type") == "Instance"]
        return ids[0] if ids else None

    def clear(self) -> None:
        """Delete every stored patient (so a shared server starts a test empty)."""
        for patient in self.get("/patients"):
            self.delete(f"/patients/{patient}")

    # -- lifetime ------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop this Orthanc by its PID: SIGTERM, then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
