"""``tritonclient.grpc``, imported lazily with a clear error when it is not installed.

tritonclient and ``edge.protos`` both define ``model_config.proto`` in protobuf package
``inference``; ours lives in a private descriptor pool (``edge.protos.POOL``), so both import
into one process in any order.
"""

from __future__ import annotations

from types import ModuleType


def grpcclient() -> ModuleType:
    """The ``tritonclient.grpc`` module.

    Raises:
        ImportError: tritonclient[grpc] is not installed (``pip install mededge[dev]``).
    """
    try:
        import tritonclient.grpc as module
    except ImportError as exc:
        raise ImportError("tritonclient[grpc] is not installed: pip install 'mededge[dev]'") \
            from exc
    return module
