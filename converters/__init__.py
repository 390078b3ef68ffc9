"""Converters: ONNX optimisation, FP16, INT8 (QDQ), TensorRT engines, accuracy gate."""
