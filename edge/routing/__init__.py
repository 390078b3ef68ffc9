"""Routing: which pipelines (models, outputs, destinations) run on a series.

:mod:`edge.routing.series` describes a series from one instance's header; :mod:`edge.routing.rules`
matches that description against the declarative rules of the settings (or, with no rules, each
model's sidecar applicability). Pure functions over frozen dataclasses, testable alone.
"""
