"""The durable spool: received bytes land in ``<root>/<Study>/<Series>/<SOPInstance>.dcm``.

Durability order for one instance (before the C-STORE success is sent):
write a temporary file under ``<root>/.incoming``, fsync it, rename it into place, fsync the
series directory (and any directory just created, up to the root). A file under its final
name is therefore always complete; a crash leaves at most a stray temporary file, removed by
:meth:`Spool.open`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from edge.core.errors import MededgeError
from edge.ingest.uids import InstanceIdentity

LOG = logging.getLogger(__name__)
INCOMING = ".incoming"
SUFFIX = ".dcm"


class OutOfResourcesError(MededgeError):
    """The spool or ledger cannot take more data now (free space under the watermark, disk
    full, ledger busy); the SCU should retry later (PS3.4 Section B.2.3, status A700)."""


@dataclass(frozen=True)
class StoredFile:
    """Where an instance is in the spool; ``written`` is False when it was already there."""

    path: Path
    size: int
    written: bool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A directory tree of received instances with a free-space watermark."""

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = Path(root).resolve()
        self.min_free_bytes = min_free_bytes
        self._incoming = self.root / INCOMING

    def open(self) -> Spool:
        """Create the spool directories and remove temporary files a crash left behind.

        Raises:
            OSError: the directories cannot be created.
        """
        self._incoming.mkdir(parents=True, exist_ok=True)
        for stray in self._incoming.iterdir():
            LOG.warning("removing incomplete spool file %s", stray.name)
            stray.unlink(missing_ok=True)
        return self

    def free_bytes(self) -> int:
        """Bytes available to this process on the spool's file system."""
        return shutil.disk_usage(self.root).free

    def has_room(self) -> bool:
        """Whether free space is at or above the watermark."""
        return self.free_bytes() >= self.min_free_bytes

    def path_for(self, identity: InstanceIdentity) -> Path:
        """The final path of ``identity`` (its UIDs are validated, so no component can escape)."""
        return (self.root / identity.study_instance_uid / identity.series_instance_uid
                / f"{identity.sop_instance_uid}{SUFFIX}")

    def store(self, identity: InstanceIdentity, data: bytes) -> StoredFile:
        """Write ``data`` durably at :meth:`path_for`; keep an existing file untouched.

        Raises:
            OutOfResourcesError: free space is under the watermark, or the disk filled up.
            OSError: any other I/O failure (the temporary file is removed).
        """
        final = self.path_for(identity)
        if final.is_file():
            return StoredFile(final, final.stat().st_size, written=False)
        if not self.has_room():
            raise OutOfResourcesError(
                f"spool free space under the watermark of {self.min_free_bytes} bytes")
        tmp = self._incoming / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._make_dirs(final.parent)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfResourcesError(f"spool disk full: {exc.strerror}") from exc
            raise
        return StoredFile(final, len(data), written=True)

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` and fsync each parent whose entries changed."""
        if directory.is_dir():
            return
        missing = []
        current = directory
        while not current.is_dir():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:  # another association made it meanwhile
                continue
            _fsync_dir(path.parent)

    def remove(self, path: Path) -> None:
        """Delete a spooled file and the series/study directories it leaves empty.

        Raises:
            ValueError: ``path`` is not inside the spool.
        """
        path = Path(path).resolve()
        if self.root not in path.parents:
            raise ValueError(f"{path} is not inside the spool {self.root}")
        path.unlink(missing_ok=True)
        for parent in (path.parent, path.parent.parent):
            if parent == self.root:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty
                break
