"""Sliced Wasserstein-2 distance of a toy2d network's samples to its target, at 1/2/4/8 steps.

    imm train --config toy2d --run-dir runs/toy2d
    python benchmarks/toy2d_distances.py runs/toy2d/network.safetensors [--target gaussians8] [--n 10000]
    python benchmarks/toy2d_distances.py runs/toy2d/network.safetensors --precision bf16   # sampled in bf16

Prints one line per setting: a freshly initialised network (1 step), the trained network at each
step count (uniform grid), and two independent draws of the target (the estimate's floor).
"""

from __future__ import annotations

import argparse

import torch

import imm
from imm.data.datasets import toy2d_sample
from imm.evaluation.toy_metrics import sliced_wasserstein
from imm.model.precision import sampling_network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--target", default="gaussians8")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--steps", default="1,2,4,8")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="sample in this precision (bf16: the network's bf16 working copy)")
    args = parser.parse_args()
    net = imm.load_network(args.checkpoint)
    net = sampling_network(net, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    target = toy2d_sample(args.target, args.n, torch.Generator().manual_seed(1))
    x_T = torch.randn(args.n, 2, 1, 1, generator=torch.Generator().manual_seed(2)) * net.sigma_data

    def distance(x):
        return sliced_wasserstein(x, target, generator=torch.Generator().manual_seed(3))

    torch.manual_seed(0)
    init = imm.IMMNetwork(**net.config).eval()
    print(f"init, 1 step: {distance(imm.sample(init, x_T)):.4f}")
    for n in map(int, args.steps.split(",")):
        print(f"{n} step(s): {distance(imm.sample(net, x_T, num_steps=n, discretization='uniform')):.4f}")
    print(f"target vs target: {distance(toy2d_sample(args.target, args.n, torch.Generator().manual_seed(7))):.4f}")


if __name__ == "__main__":
    main()
