"""imm: Inductive Moment Matching (Zhou, Ermon, Song, ICML 2025) in PyTorch."""

from imm.io.checkpoint import CheckpointError, convert, load_network, read_checkpoint, save_network
from imm.model.network import IMMNetwork
from imm.model.sampling import sample, time_grid

__version__ = "0.1.0"
__all__ = ["CheckpointError", "IMMNetwork", "IMMPipeline", "convert", "load_network", "read_checkpoint", "sample",
           "save_network", "time_grid", "__version__"]

DIFFUSERS_CLASSES = ("IMMPipeline", "IMMNetworkModel", "IMMScheduler")  # imported on first use: diffusers is optional


def __getattr__(name: str):
    if name in DIFFUSERS_CLASSES:
        from imm.interop.export import load_pipeline_classes

        return getattr(load_pipeline_classes(), name)
    raise AttributeError(f"module 'imm' has no attribute {name!r}")
