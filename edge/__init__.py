"""mededge: the scanner-side AI box.

The runtime is a one-way pipeline of stages (see ``docs/architecture.md``); each stage lives in its
own subpackage and imports only earlier stages and :mod:`edge.core`.
"""

__version__ = "0.1.0"
