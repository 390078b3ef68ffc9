"""Python modules generated from ``proto/`` by ``make proto`` (grpcio-tools). Do not edit.

They are committed so that a plain ``pip install`` works without grpcio-tools; a test checks
that they match the ``.proto`` sources.
"""
