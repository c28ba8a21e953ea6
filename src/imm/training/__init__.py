"""``imm train`` and ``imm demo``: the training config, the loop, its logs and sample grids, EMA and
post-hoc EMA."""
