"""Training objectives on the model layer's networks, no I/O: the IMM loss (``moment_matching``), the
flow-matching and consistency-training baselines, and the registry that names them (``loss.kind``)."""
