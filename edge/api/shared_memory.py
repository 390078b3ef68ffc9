"""System shared memory regions: KServe v2's ``system_shared_memory`` extension, as Triton has it.

A client on the same host creates a POSIX shared-memory object (``shm_open(key)``: on Linux the
file ``/dev/shm/<key>``), registers a window of it as a named region, and then names the region
in an input's or requested output's parameters instead of sending the tensor's bytes:
``shared_memory_region`` (the name), ``shared_memory_byte_size``, ``shared_memory_offset``
(within the region, default 0). An input is then a numpy view of the mapped memory (no copy;
the request is a few hundred bytes whatever the tensor's size) and an output is written into the
region instead of the answer. tritonclient's ``utils.shared_memory`` and perf_analyzer's
``--shared-memory system`` make regions this way.

Each region maps the whole object once, at registration; unregistering drops the mapping when
the last request using it is done (numpy views keep it alive), so an in-flight request never
reads freed memory. Keys are single names under /dev/shm: a key with a path in it is refused.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from edge.core.errors import InvalidInputError, MededgeError

#: Where glibc's shm_open puts POSIX shared-memory objects.
SHM_ROOT = Path("/dev/shm")


class SharedMemoryNotFoundError(MededgeError):
    """No region of that name is registered (gRPC NOT_FOUND)."""


class SharedMemoryExistsError(MededgeError):
    """A region of that name is already registered (gRPC ALREADY_EXISTS)."""


@dataclass(frozen=True)
class Region:
    """A registered region: bytes ``offset .. offset + byte_size`` of the object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int
    memory: memoryview  # exactly the region's bytes, writable


def _object_path(key: str) -> Path:
    """The file behind a shm_open key ('/name' or 'name'; leading slashes are dropped as glibc
    does).

    Raises:
        InvalidInputError: the key is empty or holds a path.
    """
    name = key.lstrip("/")
    if not name or "/" in name or name in (".", ".."):
        raise InvalidInputError(
            f"shared memory key {key!r}: expected one shm_open name such as '/input0'")
    return SHM_ROOT / name


def _map(name: str, key: str, offset: int, byte_size: int) -> memoryview:
    path = _object_path(key)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise InvalidInputError(
            f"shared memory region {name!r}: cannot open key {key!r}: {exc.strerror}") from exc
    try:
        size = os.fstat(fd).st_size
        if byte_size <= 0 or offset + byte_size > size:
            raise InvalidInputError(
                f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} does "
                f"not fit in key {key!r} ({size} bytes)")
        mapping = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return memoryview(mapping)[offset:offset + byte_size]


class SharedMemoryRegistry:
    """The registered regions of one server; safe to use from every gRPC thread."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes at ``offset`` of the object ``key`` as region ``name``.

        Raises:
            InvalidInputError: no name, a bad or missing key, or a window past the object's end.
            SharedMemoryExistsError: ``name`` is registered already.
        """
        if not name:
            raise InvalidInputError("shared memory region: name is empty")
        with self._lock:
            if name in self._regions:
                raise SharedMemoryExistsError(
                    f"shared memory region {name!r} is already registered")
            memory = _map(name, key, offset, byte_size)
            self._regions[name] = Region(name, key, offset, byte_size, memory)

    def unregister(self, name: str) -> None:
        """Forget region ``name`` ("" every region); unknown names are not an error (Triton)."""
        with self._lock:
            if name:
                self._regions.pop(name, None)
            else:
                self._regions.clear()

    def status(self, name: str) -> list[Region]:
        """Region ``name``, or every region for "".

        Raises:
            SharedMemoryNotFoundError: ``name`` is not registered.
        """
        with self._lock:
            if not name:
                return list(self._regions.values())
            region = self._regions.get(name)
        if region is None:
            raise SharedMemoryNotFoundError(f"shared memory region {name!r} is not registered")
        return [region]

    def window(self, tensor: str, name: str, offset: int, byte_size: int) -> memoryview:
        """``byte_size`` bytes at ``offset`` of region ``name``, for the tensor named ``tensor``.

        Raises:
            InvalidInputError: the region is not registered or the window does not fit in it;
                the message names the tensor and the region.
        """
        region = self._regions.get(name)
        if region is None:
            raise InvalidInputError(
                f"{tensor}: shared memory region {name!r} is not registered")
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise InvalidInputError(
                f"{tensor}: offset {offset} + byte_size {byte_size} does not fit in shared "
                f"memory region {name!r} ({region.byte_size} bytes)")
        return region.memory[offset:offset + byte_size]
