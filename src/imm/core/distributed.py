"""torch.distributed helpers: one process per device under torchrun, or a single process without it; and
the device's float32 matmul precision (:func:`set_tf32`)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: str | torch.device | None = None) -> torch.device:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU); return this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def set_tf32(device: torch.device, enabled: bool = True) -> None:
    """Let float32 matmuls and cuDNN convolutions on a CUDA ``device`` use TF32 tensor cores (10-bit
    mantissa inputs, float32 accumulation), or not; other devices are left as they are."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def from_main(value):
    """``value`` as the main process has it, on every process (one broadcast; itself when alone)."""
    if not dist.is_initialized():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(params) -> None:
    """Average the gradients of ``params`` over the processes in one all-reduce (a parameter without a gradient
    counts as zeros and receives the average), as DDP's backward pass would; nothing when alone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p).to(p.dtype)


def shutdown(synchronize: bool = False) -> None:
    """Leave the process group. ``synchronize``: first wait for every process (a command that ended normally
    everywhere), so that no process tears its connections down while another still uses them."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def full_state_dict(module: torch.nn.Module) -> dict:
    """A full, CPU state_dict (gathers FSDP2 shards)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in module.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().to("cpu").clone()
    return out
