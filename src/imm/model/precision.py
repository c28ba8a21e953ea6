"""A network's working copy in a low precision and a memory layout (:func:`working_copy`), and its refresh from
the full-precision weights (:func:`copy_weights`).

Mixed-precision training with fp32 master weights (Micikevicius et al., "Mixed Precision Training", ICLR 2018):
the optimizer, the EMAs and the checkpoints hold the fp32 network; each step casts its weights once into a
bf16 copy, runs the forward and backward passes there, and hands the bf16 gradients back to the fp32
weights. Unlike autocast, which casts every operation's inputs at every call (and runs GroupNorm and the
elementwise operations in fp32 between them), the copy computes the whole backbone in bf16 with no casts
inside. Only parameters change precision (DiT's fixed position table, a frozen parameter, included): buffers
(the UNet's Fourier frequencies of the time embedding, resampling filters) keep theirs, and the backbones
compute the time features in fp32 before the first layer, so the copy embeds times as the fp32 network does.
:class:`imm.model.network.IMMNetwork` feeds its backbone in the backbone's parameter dtype and returns fp32.
"""

from __future__ import annotations

import copy

import torch


def working_copy(net: torch.nn.Module, dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.nn.Module:
    """A deep copy of ``net`` whose floating-point parameters are ``dtype`` (4-D ones in ``memory_format``),
    with no gradients; ``net`` itself is unchanged."""
    out = copy.deepcopy(net)
    for p in out.parameters():
        p.grad = None
        if p.is_floating_point():
            p.data = p.data.to(dtype=dtype, memory_format=memory_format if p.ndim == 4 else torch.preserve_format)
    for b in out.buffers():
        if b.ndim == 4:
            b.data = b.data.contiguous(memory_format=memory_format)
    return out


@torch.no_grad()
def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """``dst``'s parameters set to ``src``'s, cast to ``dst``'s dtypes and layouts (same architecture)."""
    for d, s in zip(dst.parameters(), src.parameters(), strict=True):
        d.copy_(s)


def move_gradients(dst_params: list[torch.Tensor], src_params: list[torch.Tensor]) -> None:
    """Each ``src`` gradient cast into its ``dst`` parameter's ``.grad`` (replacing it) and cleared in ``src``."""
    for d, s in zip(dst_params, src_params, strict=True):
        d.grad = None if s.grad is None else s.grad.to(dtype=d.dtype, memory_format=torch.preserve_format)
        s.grad = None


def sampling_network(net: torch.nn.Module, dtype: torch.dtype = torch.float32,
                     memory_format: torch.memory_format = torch.contiguous_format) -> torch.nn.Module:
    """What samples ``net`` in ``dtype`` and ``memory_format``: ``net`` itself for fp32 in the contiguous layout,
    else its working copy in eval mode."""
    if dtype == torch.float32 and memory_format == torch.contiguous_format:
        return net
    return working_copy(net, dtype, memory_format).eval().requires_grad_(False)
