"""Synthetic chest CT / DX studies with ground truth (``mededge synth``; numpy, scipy, pydicom,
nibabel only: no torch)."""
