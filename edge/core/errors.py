"""One error hierarchy for the whole runtime.

Front ends map these to protocol statuses in exactly one place each: gRPC codes in
``edge.api.errors``, DIMSE statuses in the DICOM listener. Messages name the offending field,
model or input so a caller can act on them.
"""

from __future__ import annotations


class MededgeError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(MededgeError):
    """A configuration file or value is invalid; the message names the key."""


class RepositoryError(MededgeError):
    """A model repository entry is missing, malformed or fails its integrity check."""


class ModelNotFoundError(MededgeError):
    """The named model (or version) is not in the repository."""


class ModelNotReadyError(MededgeError):
    """The model exists but is not loaded and warmed up."""


class InvalidInputError(MededgeError):
    """A request's input has the wrong name, shape, datatype or byte size."""


class QueueFullError(MededgeError):
    """A model's bounded queue is full; the request was rejected, not queued."""


class DeadlineExceededError(MededgeError):
    """A request's deadline passed before it was executed."""


class CancelledError(MededgeError):
    """The caller went away before the request was executed."""


class BackendError(MededgeError):
    """The inference backend failed while executing a batch."""


class ExportError(MededgeError):
    """A model export or its parity check failed."""


class DataError(MededgeError):
    """A dataset file is unreadable or inconsistent; the message names the file."""
