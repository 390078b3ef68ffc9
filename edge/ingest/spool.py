"""The durable spool: received bytes land in ``<root>/<Study>/<Series>/<SOPInstance>.dcm``.

One device flush per instance (docs/dicom.md, "Durability order"): the bytes are written to
``<series dir>/<SOPInstance>.<size>.<random>.part``, that file is fsync'd (its data, its size
and, on the file systems in :data:`ONE_FLUSH_FS`, its directory entry and the directories it
sits in), then renamed to its final name; the rename is not flushed. After a crash an
acknowledged instance is therefore either under its final name, complete, or under its
``.part`` name with its full size. :meth:`Spool.open` finishes such renames and removes
shorter ``.part`` files (never acknowledged). Elsewhere the series directory is fsync'd after
the rename too (two flushes).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge.core.durable import fsync_path
from edge.core.errors import MededgeError
from edge.ingest.uids import InstanceIdentity

LOG = logging.getLogger(__name__)
INCOMING = ".incoming"  # where earlier versions kept temporary files; emptied by open()
SUFFIX = ".dcm"
PART = ".part"
#: File systems on which fsync of a new file also persists its directory entry, and whose
#: on-disk size never covers unwritten data (ext4 data=ordered or journal, xfs, btrfs).
ONE_FLUSH_FS = frozenset({"ext4", "xfs", "btrfs"})


class OutOfResourcesError(MededgeError):
    """The spool or ledger cannot take more data now (free space under the watermark, disk
    full, ledger busy); the SCU should retry later (PS3.4 Section B.2.3, status A700)."""


@dataclass(frozen=True)
class StoredFile:
    """Where an instance is in the spool; ``written`` is False when it was already there."""

    path: Path
    size: int
    written: bool


@dataclass(frozen=True)
class Recovery:
    """What :meth:`Spool.open` repaired after a crash."""

    promoted: tuple[Path, ...]  # complete .part files renamed to their final name
    removed: int  # incomplete or superseded temporary files


def _mount_of(path: Path) -> tuple[str, str]:
    """(file system type, mount options) of the mount holding ``path``; ('', '') if unknown."""
    best, found = "", ("", "")
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as info:
            for line in info:
                fields = line.split()
                sep = fields.index("-")
                mount, opts = fields[4].replace("\\040", " "), fields[5]
                inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, found = mount, (fields[sep + 1], f"{opts},{fields[sep + 3]}")
    except (OSError, ValueError, IndexError):
        return "", ""
    return found


def one_flush_safe(path: Path) -> bool:
    """Whether one fsync of a new file in ``path`` makes its data, size and name durable."""
    fstype, options = _mount_of(Path(path).resolve())
    return fstype in ONE_FLUSH_FS and "data=writeback" not in options


def _part_target(part: Path) -> tuple[Path, int] | None:
    """(final path, expected size) encoded in a ``<uid>.<size>.<random>.part`` name."""
    pieces = part.name.rsplit(".", 3)
    if len(pieces) != 4 or f".{pieces[3]}" != PART or not pieces[1].isdigit():
        return None
    return part.with_name(pieces[0] + SUFFIX), int(pieces[1])


class Spool:
    """A directory tree of received instances with a free-space watermark."""

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = Path(root).resolve()
        self.min_free_bytes = min_free_bytes
        self.one_flush = False  # decided by open()
        self.recovered = Recovery((), 0)  # what open() repaired

    def open(self) -> Spool:
        """Create the root, decide the flush mode and repair what a crash left (see
        :meth:`recover`).

        Raises:
            OSError: the directories cannot be created or repaired.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.one_flush = one_flush_safe(self.root)
        if not self.one_flush:
            LOG.warning("spool %s: file system not known to persist a new file's name with "
                        "its fsync; fsyncing directories too (slower)", self.root)
        self.recovered = self.recover()
        return self

    def recover(self) -> Recovery:
        """Rename each complete ``.part`` file (full size: fsync'd, maybe acknowledged) to its
        final name, made durable; remove the others. Run before the listener accepts.

        Raises:
            OSError: a file cannot be renamed or removed.
        """
        promoted: list[Path] = []
        removed = 0
        legacy = self.root / INCOMING
        if legacy.is_dir():
            for stray in legacy.iterdir():
                stray.unlink(missing_ok=True)
                removed += 1
        for part in sorted(self.root.glob(f"*/*/*{PART}")):
            target = _part_target(part)
            if target is None or target[0].exists() or part.stat().st_size != target[1]:
                LOG.warning("removing incomplete spool file %s", part.name)
                part.unlink(missing_ok=True)
                removed += 1
                continue
            fsync_path(part)
            os.replace(part, target[0])
            fsync_path(part.parent)
            promoted.append(target[0])
        if promoted:
            LOG.warning("spool: finished %d interrupted renames", len(promoted))
        return Recovery(tuple(promoted), removed)

    def files(self) -> Iterator[Path]:
        """Every instance under its final name (``<root>/<Study>/<Series>/<uid>.dcm``)."""
        return self.root.glob(f"*/*/*{SUFFIX}")

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

    def store(self, identity: InstanceIdentity, *chunks: bytes | memoryview) -> StoredFile:
        """Write the concatenated ``chunks`` durably at :meth:`path_for`; keep an existing file.

        An existing final file was fsync'd before it got its name, so a repeat needs no flush.

        Raises:
            OutOfResourcesError: free space is under the watermark, or the disk filled up.
            OSError: any other I/O failure (the temporary file is removed).
        """
        final = self.path_for(identity)
        try:
            existing = StoredFile(final, final.stat().st_size, written=False)
        except FileNotFoundError:
            pass
        else:
            if not self.one_flush:  # its rename may not have been flushed yet
                fsync_path(final.parent)
            return existing
        if not self.has_room():
            raise OutOfResourcesError(
                f"spool free space under the watermark of {self.min_free_bytes} bytes")
        size = sum(len(chunk) for chunk in chunks)
        self._make_dirs(final.parent)
        tmp = final.with_name(f"{identity.sop_instance_uid}.{size}.{uuid.uuid4().hex[:8]}{PART}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)  # the one flush: data, size, and (ONE_FLUSH_FS) the .part name
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if not self.one_flush:
                fsync_path(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfResourcesError(f"spool disk full: {exc.strerror}") from exc
            raise
        return StoredFile(final, size, written=True)

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` and fsync each parent whose entries changed (once per series)."""
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
            fsync_path(path.parent)

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
