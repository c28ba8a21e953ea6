"""Training objectives on the model layer's networks, no I/O: the IMM loss (``moment_matching``), the
flow-matching (``flow_matching``), consistency-training (``consistency``) and MeanFlow (``meanflow``) baselines,
their compute per sample (``cost``), and the registry that names them (``loss.kind``)."""
