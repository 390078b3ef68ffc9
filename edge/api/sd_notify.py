"""systemd's notify protocol (sd_notify(3)) without libsystemd: READY, WATCHDOG, STOPPING.

A service started with ``Type=notify`` gets ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace) and sends newline-separated ``KEY=VALUE`` datagrams there. With
``WatchdogSec=`` it also gets ``$WATCHDOG_USEC`` and must send ``WATCHDOG=1`` more often than
that, or systemd restarts it. Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _address(environ: Mapping[str, str]) -> str | None:
    path = environ.get("NOTIFY_SOCKET", "")
    if not path or not (path.startswith("/") or path.startswith("@")):
        return None  # unset, or a vsock address this module does not speak
    return "\0" + path[1:] if path.startswith("@") else path


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not under systemd.

    Never raises: a failed send is logged, since the service works without systemd's view.
    """
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify %s: %s", state.split("=", 1)[0], exc)
        return False
    return True


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds (systemd's advice), or None without a watchdog.

    ``$WATCHDOG_PID``, when set, must be this process, else the watchdog is not ours.
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Watchdog:
    """Sends ``WATCHDOG=1`` every interval while ``healthy()`` holds, in a daemon thread.

    When ``healthy()`` is false (or raises) the ping is skipped, so a hung or broken service is
    restarted by systemd instead of being reported alive.
    """

    def __init__(self, healthy: Callable[[], bool], interval_s: float,
                 environ: Mapping[str, str] | None = None) -> None:
        self._healthy = healthy
        self._interval = interval_s
        self._environ = environ
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                ok = self._healthy()
            except Exception:  # a probe that fails is an unhealthy service, not a dead thread
                log.exception("watchdog health probe failed")
                ok = False
            if ok:
                notify("WATCHDOG=1", self._environ)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._interval + 1)


def service_ready(healthy: Callable[[], bool]) -> Watchdog | None:
    """Tell systemd the service is ready and start the watchdog pings it asked for."""
    notify("READY=1\nSTATUS=serving")
    interval = watchdog_interval_s()
    return Watchdog(healthy, interval).start() if interval else None


def service_stopping(watchdog: Watchdog | None) -> None:
    """Tell systemd the service is stopping (so the drain is not killed as a hang)."""
    notify("STOPPING=1")
    if watchdog is not None:
        watchdog.stop()
