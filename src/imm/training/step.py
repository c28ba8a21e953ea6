"""One optimizer step of ``imm train`` (:class:`TrainStep`): gradient accumulation over the step's chunks,
mixed precision, gradient clipping, the skip of a step with non-finite gradients, and the EMA updates.

Chunks and randomness: the step's global batch is split into chunks of ``batch_per_device`` samples, each
process runs ``accumulation`` of them, and chunk ``c = rank * accumulation + micro`` of step ``step`` draws
everything random (times, noise, label dropout, flips, VAE latents, dropout masks) from a generator seeded by
``(seed, step, c)`` (:func:`chunk_seed`). The draws of a chunk therefore do not depend on which process runs
it: W processes with A accumulation steps train like one process with W*A, and a run resumed on another
number of processes trains on as if it had never moved.

Precision (``training.precision``, ``auto`` resolved by :func:`imm.training.config.fast_path`): bf16 runs the
passes in the state's bf16 working copy (:mod:`imm.model.precision`): the fp32 weights are cast into it once
at the start of the step and its gradients handed back to them after the last chunk, where clipping, the
optimizer and the EMAs work in fp32; the network's output, and so the loss (kernels, reductions), is fp32.
fp16, and bf16 with FSDP2, is the network's autocast (``IMMNetwork(mixed_precision=)``); fp16 adds the
state's GradScaler, used here only. tf32 allows TF32 matmuls and convolutions on CUDA
(``imm.core.distributed.set_tf32``). With ``training.memory_format=channels_last`` the inputs are handed
to the network in that layout, as its weights are.

Processes: DDP averages the gradients in the backward pass of the last chunk; a loss whose gradient pass runs on
the unwrapped network (``unwrapped_gradients``: MeanFlow's forward-mode JVP cannot run through DDP) has them averaged
here after the last chunk instead (:func:`imm.core.distributed.average_gradients`).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from imm.core import distributed
from imm.data.datasets import random_xflip
from imm.model.precision import copy_weights, move_gradients
from imm.training.checkpoints import TrainingError
from imm.training.config import OptimizerSection, TrainingSection
from imm.training.logs import StepWindow
from imm.training.state import TrainingState


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1, dtype=np.uint64)[0] >> 1)


def learning_rate(step: int, opt: OptimizerSection) -> float:
    """``optimizer.lr``, ramped up linearly over the first ``optimizer.warmup_steps`` steps."""
    return opt.lr * min(1.0, (step + 1) / opt.warmup_steps) if opt.warmup_steps else opt.lr


class TrainStep:
    """``step(raw, labels)`` takes one optimizer step of ``state`` on this process's share of a global batch
    and returns whether it was applied (finite gradients). A skipped step leaves the network, the optimizer
    and the fixed-decay EMAs as they were; the post-hoc EMA profiles (over steps) and the step count advance.

    Host syncs: one per step, reading whether the gradient norm is finite (the skip is a branch on the host;
    an exact skip on the device would need the optimizer's own ``found_inf`` support, which RAdam lacks);
    with fp16, GradScaler.step reads the same flag. The loss sums and gradient norms stay on the device
    (:class:`imm.training.logs.StepWindow`)."""

    def __init__(self, state: TrainingState, model: torch.nn.Module, loss_fn, encoder, training: TrainingSection,
                 opt: OptimizerSection, chunk: int, accumulation: int, device, window: StepWindow):
        self.state, self.loss_fn, self.encoder, self.window = state, loss_fn, encoder, window
        self.training, self.opt, self.device = training, opt, device
        self.chunk, self.accumulation = chunk, accumulation
        self.first_chunk = distributed.rank() * accumulation
        self.ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
        self.forward = torch.compile(model) if training.compile else model
        compute = state.compute_net  # the no-grad pass runs it outside DDP
        self.target = torch.compile(compute) if training.compile else compute
        trained = [(p, c) for p, c in zip(state.net.parameters(), compute.parameters()) if p.requires_grad]
        self.params = [p for p, _ in trained]
        self.compute_params = [c for _, c in trained]
        self.max_norm = opt.grad_clip or math.inf

    def __call__(self, raw: torch.Tensor, labels: torch.Tensor) -> bool:
        if not self.training.compile:
            return self._step(raw, labels)
        try:  # torch.compile builds its kernels in the first calls
            return self._step(raw, labels)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            raise TrainingError(f"torch.compile failed on this network in {self.training.precision} on "
                                f"{self.device.type} ({str(e).strip().splitlines()[-1][:200]}); "
                                "train with training.compile=false") from None

    def _step(self, raw: torch.Tensor, labels: torch.Tensor) -> bool:
        state, scaler, step = self.state, self.state.scaler, self.state.step
        self.loss_fn.set_progress(step, self.training.total_steps)  # iCT's N(k) curriculum, IMM's gap annealing
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate(step, self.opt)
        if state.working is not None:
            copy_weights(state.working, state.net)
        for micro in range(self.accumulation):
            with self._no_sync(micro):
                loss, stats = self._chunk_loss(raw, labels, micro, step)
                scaled = loss / self.accumulation
                (scaler.scale(scaled) if scaler else scaled).backward()
            self.window.add(loss.detach(), stats)
        if state.working is not None:
            move_gradients(self.params, self.compute_params)
        if self.ddp is not None and getattr(self.loss_fn, "unwrapped_gradients", False):
            distributed.average_gradients(self.params)  # the loss's gradient pass ran outside DDP's hooks
        if scaler:
            scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(grad_norm))  # the step's host sync
        if finite:
            scaler.step(state.optimizer) if scaler else state.optimizer.step()
            state.update_emas(self.training.ema_warmup)
        state.step += 1
        if state.phema is not None:  # skipped steps too: the profile is over steps, the weights stayed put
            state.phema.update(state.net, state.step)
        if scaler:
            scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        self.window.grad_norm(grad_norm)
        return finite

    def _chunk_loss(self, raw, labels, micro: int, step: int):
        seed = chunk_seed(self.training.seed, step, self.first_chunk + micro)
        torch.manual_seed(seed)  # dropout masks of this chunk
        gen = torch.Generator(self.device).manual_seed(seed)
        part = slice(micro * self.chunk, (micro + 1) * self.chunk)
        x = self.encoder.encode_latents(raw[part].to(self.device, non_blocking=True), generator=gen)
        if self.training.xflip:
            x = random_xflip(x, gen)
        if x.ndim == 4:
            x = x.contiguous(memory_format=self.training.layout)
        # class ids stay on the host: the loss's one-hot checks their range there (no device sync) and moves it
        y = labels[part] if self.state.net.label_dim else None
        return self.loss_fn(self.forward, x, y, target_net=self.target, generator=gen)

    def _no_sync(self, micro: int):
        """DDP averages gradients in the backward pass of the last chunk only (forward and backward inside)."""
        last = micro == self.accumulation - 1
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
