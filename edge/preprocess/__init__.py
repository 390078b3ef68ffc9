"""Pixel decoding and the preprocessing shared by the trainer and the runtime (numpy, opencv)."""
