"""Jobs: the durable ledger of what was received and what the pipeline did with it.

May import :mod:`edge.ingest` (the stage before it) and :mod:`edge.core`.
"""
