"""Sampling runs and their measurement: one resolver of what a run samples (``sampling_run``), ``imm
generate``, the FID Inception network, DINOv2, Frechet distances, precision/recall, and ``imm eval``."""
