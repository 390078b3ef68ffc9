"""Inference backends: one interface, one module per backend, lazy heavy imports."""
