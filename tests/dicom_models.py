"""The tiny chest CT model repository of the DICOM-path tests: ``edge.tools.chest_models`` (the
time-to-result benchmark uses the same models), re-exported for the tests' imports."""

from edge.tools.chest_models import build_repository

__all__ = ["build_repository"]
