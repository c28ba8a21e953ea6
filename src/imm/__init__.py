"""imm: Inductive Moment Matching (Zhou, Ermon, Song, ICML 2025) in PyTorch."""

from .checkpoint import CheckpointError, convert, load_network, read_checkpoint, save_network
from .precond import IMMNetwork
from .sampling import sample, time_grid

__version__ = "0.1.0"
__all__ = ["CheckpointError", "IMMNetwork", "convert", "load_network", "read_checkpoint", "sample",
           "save_network", "time_grid", "__version__"]
