"""``tritonclient.grpc``, imported so that it can live in one process with ``edge.protos``.

tritonclient ships its own ``model_config.proto`` and ``grpc_service.proto`` in protobuf package
``inference``; so do we. Both register in protobuf's default descriptor pool, and the second to
import fails with "duplicate file name model_config.proto". Clients (``mededge infer``, the
benchmarks, the tests) therefore import tritonclient through :func:`grpcclient`, which builds
its descriptors in a private pool: the wire format is unchanged, only the Python-side registry
differs. (The lasting fix, generating ``edge.protos`` into a private pool, is proposed in
docs/serving-interfaces.md.)
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

_lock = threading.Lock()


def grpcclient() -> ModuleType:
    """The ``tritonclient.grpc`` module, its protobuf descriptors kept out of the default pool.

    Raises:
        ImportError: tritonclient[grpc] is not installed (``pip install mededge[dev]``).
    """
    with _lock:
        loaded = sys.modules.get("tritonclient.grpc")
        if loaded is not None:
            return loaded
        from google.protobuf import descriptor_pool

        default = descriptor_pool.Default
        private = descriptor_pool.DescriptorPool()
        descriptor_pool.Default = lambda: private  # only while tritonclient's stubs register
        try:
            import tritonclient.grpc as module
        finally:
            descriptor_pool.Default = default
        return module
