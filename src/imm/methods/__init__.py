"""Training objectives on the model layer's networks, no I/O: the IMM loss (``moment_matching``), the
flow-matching (``flow_matching``) and consistency-training (``consistency``) baselines, and the registry that names them (``loss.kind``)."""
