"""torch.distributed helpers: one process per device under torchrun or SLURM's srun (:func:`launch` decides
which), or a single process without either; and the device's float32 matmul precision (:func:`set_tf32`)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from imm.core.errors import StateError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")
SLURM_PORT_BASE, SLURM_PORTS = 20000, 20000  # a job's rendezvous port: SLURM_PORT_BASE + job id % SLURM_PORTS


@dataclass(frozen=True)
class Launch:
    """How this process was started: ``kind`` is ``single`` (one process), ``torchrun`` or ``slurm`` (one task
    per device under ``srun``, no torchrun), with this process's ``rank``, ``local_rank``, the ``world_size``
    and the rendezvous address of rank 0."""

    kind: str = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


def launch(environ=None) -> Launch:
    """The one place that decides which launcher started this process, from its environment:

    * torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (all five);
    * ``srun`` sets ``SLURM_PROCID`` in each task of a job step (``SLURM_STEP_ID``), with the step's
      ``SLURM_STEP_NUM_TASKS`` (else the job's ``SLURM_NTASKS``), ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``
      (rank 0 runs on its first host: :func:`first_host`) and ``SLURM_JOB_ID`` (the port
      :data:`SLURM_PORT_BASE` + id mod :data:`SLURM_PORTS`, so two jobs on one node do not meet);
    * otherwise, also in an sbatch script outside ``srun``, one process.

    A half-set environment (some of torchrun's five, or a task of ``srun`` without the rest) is one
    :class:`~imm.core.errors.StateError` line naming what is missing."""
    env = os.environ if environ is None else environ
    given = [k for k in TORCHRUN_VARIABLES if k in env]
    if given == ["WORLD_SIZE"] and env["WORLD_SIZE"] == "1":  # a lone WORLD_SIZE=1 says one process
        given = []
    if given:
        missing = [k for k in TORCHRUN_VARIABLES if k not in env]
        if missing:
            raise StateError(f"a half-set torchrun environment: {', '.join(given)} set but not {', '.join(missing)} "
                             "(launch with torchrun, srun, or neither)")
        return Launch("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK"),
                      env["MASTER_ADDR"], _int(env, "MASTER_PORT"))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        missing = [k for k in SLURM_VARIABLES if k not in env]
        if "SLURM_STEP_NUM_TASKS" not in env and "SLURM_NTASKS" not in env:
            missing.append("SLURM_STEP_NUM_TASKS or SLURM_NTASKS")
        if missing:
            raise StateError(f"a half-set SLURM task environment: {', '.join(missing)} not set (run imm under srun, "
                             "one task per device)")
        world = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
        if world > 1:
            port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORTS
            return Launch("slurm", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID"),
                          first_host(env["SLURM_JOB_NODELIST"]), port)
    return Launch()


def _int(env, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise StateError(f"{key}={env[key][:40]!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: the list's first name when it holds no range (``node3,node4``),
    else the first line of ``scontrol show hostnames`` (``node[3-4]``)."""
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    try:
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise StateError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol show hostnames ({e})") from None
    return done.stdout.split()[0]


def init(device: str | torch.device | None = None) -> torch.device:
    """Join the process group when launched by torchrun or srun (:func:`launch`; NCCL on GPU, gloo on CPU);
    return this rank's device."""
    started = launch()
    if started.kind == "slurm":  # what torch.distributed's env:// rendezvous reads, as torchrun sets it
        os.environ.update(RANK=str(started.rank), WORLD_SIZE=str(started.world_size),
                          LOCAL_RANK=str(started.local_rank), MASTER_ADDR=started.master_addr,
                          MASTER_PORT=str(started.master_port))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", started.local_rank)
        torch.cuda.set_device(device)
    if started.world_size > 1 and not dist.is_initialized():
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
