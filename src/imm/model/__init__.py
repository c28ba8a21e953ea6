"""The networks and their math, no I/O: the interpolation schedules, ``IMMNetwork`` (the paper's
f_{s,t} around a backbone), the backbones (DDPM++ UNet, DiT, a toy MLP) and the few-step samplers."""
