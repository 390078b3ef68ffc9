"""The orchestration of the DICOM path: above the stages, below the front ends.

:mod:`edge.pipeline.tracker` decides when a series is complete (a pure state machine);
:mod:`edge.pipeline.orchestrator` routes, preprocesses and infers each instance as it arrives
and, once the series is complete, aggregates, writes SEG/SR and queues their delivery;
:mod:`edge.pipeline.metrics` exposes the ``mededge_*`` Prometheus families.
"""
