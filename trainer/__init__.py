"""Training: datasets, models, augmentation, loops, metrics, ONNX export (needs [train])."""
