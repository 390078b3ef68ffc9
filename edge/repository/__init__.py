"""The model repository: Triton's layout plus a mededge sidecar per model.

``REPO/NAME/config.pbtxt``, ``REPO/NAME/<version>/model.onnx`` (or ``model.plan``), and
``REPO/NAME/mededge.yaml`` with what Triton does not know.
"""
