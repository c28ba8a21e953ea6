"""Training compute per sample in forward-pass equivalents, counted with ``torch.utils.flop_counter``.

A method's training step (its loss and the backward pass) is counted in the floating-point operations of
PyTorch's FLOP counter (matrix products, convolutions, attention: the operations that dominate a network's
cost) and divided by those of one forward pass of the same network on the same batch. The registry's
``forward_equivalents`` (:data:`imm.methods.registry.METHODS`), which the benchmarks use to give every method
the same compute, are these counts rounded; ``tests/unit/test_meanflow.py`` checks them on the UNet, DiT and
MLP backbones.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn) -> int:
    """The FLOPs PyTorch's counter sees while ``fn()`` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_equivalents(loss, net, images: torch.Tensor, labels=None, seed: int = 0) -> float:
    """One training step of ``loss`` (a ``TrainingLoss``) on ``net`` and ``images``, forward and backward, in
    forward passes of ``net`` on the same batch. The network's gradients are left cleared."""
    t = torch.full((images.shape[0],), 0.5)
    onehot = net.one_hot(labels, images.shape[0], images.device) if labels is not None else None
    with torch.no_grad():
        forward = count_flops(lambda: net(images, t, t * 0.5, class_labels=onehot))

    def step():
        value, _ = loss(net, images, labels, target_net=net, generator=torch.Generator().manual_seed(seed))
        value.backward()

    total = count_flops(step)
    net.zero_grad(set_to_none=True)
    return total / forward
