"""What every layer uses: the expected-error classes, configs as data (presets, dotted overrides, the one
key-checking rule), processes (torch.distributed) and CPU threads. Imports nothing else of imm."""
