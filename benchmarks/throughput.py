"""Training and sampling throughput against the hardware limit (model FLOP utilisation), eager vs compile.

    python benchmarks/throughput.py --device cuda      # DDPM++ CIFAR-10 (batch 256, TF32) and DiT-XL/2
                                                       # ImageNet (batch 128, bf16); about 5-8 min on an H100
    python benchmarks/throughput.py                    # CPU: the same script on smaller models
    python benchmarks/throughput.py --quick            # smoke run (the test suite calls it)
    python benchmarks/throughput.py --compare-checkpointing --cases dit-s2   # peak memory with and without
                                                       # training.activation_checkpointing (one process each)
    python benchmarks/throughput.py --device cuda --cases ddpmpp --batch 512 --methods imm,meanflow --no-compile
                                                       # IMM against MeanFlow on CIFAR-sized data (a few minutes)

The CPU cases run the small UNet in fp32 and bf16, each contiguous and in channels_last, as the trainer
runs them (bf16: the fp32 network's bf16 working copy, :mod:`imm.model.precision`). For each case, in eager
mode and compiled with torch.compile (run side by side in one process):

* training samples/s of a full IMM step (the no-grad target pass, the gradient pass, backward, the
  optimizer step), as the trainer does it (``imm.methods.registry.build_loss``, ``imm.training.state.make_optimizer``);
* images/s of 1-step sampling (``imm.sample``; with CFG 1.5, i.e. a doubled batch, for the
  class-conditional DiT);
* peak memory (CUDA: max allocated; CPU: the process's peak RSS, for the whole run);
* model FLOP utilisation: FLOPs counted by ``torch.utils.flop_counter`` on one eager step (matmuls,
  convolutions, attention; forward and backward) / measured time / the device's peak (dense bf16 or
  TF32 of the table below), and against the rates of a matmul and of a 3x3 convolution (forward and
  backward) measured in the same run, in the case's precision and layout;
* the share of a training step spent in the IMM loss itself (time sampling, noise, r(s,t), weights,
  kernel matrices): the same loss call on a pass-through network of the same tensor shapes, over the
  real step time.

``--methods`` trains each case with other methods of the registry (``imm.methods.registry``) too, each with its
loss's defaults and the network settings the method requires (MeanFlow: ``f_type=euler_fm``), and checks that the
counted FLOPs of a step are the registry's forward-pass equivalents (IMM 4, MeanFlow 5) times a forward pass. A
method that cannot train compiled (MeanFlow's JVP) runs eager only, and one that cannot train channels_last
(MeanFlow) skips those cases.

Prints a table and one JSON line (also written with --json-out).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import CONFIGS  # noqa: E402  (the released network configurations)

import imm  # noqa: E402
from imm.core.distributed import set_tf32  # noqa: E402
from imm.methods.registry import METHODS, build_loss, cannot_train_with  # noqa: E402
from imm.model.backbones import set_activation_checkpointing  # noqa: E402
from imm.model.precision import copy_weights, move_gradients, sampling_network, working_copy  # noqa: E402
from imm.training.config import OptimizerSection  # noqa: E402
from imm.training.state import make_optimizer  # noqa: E402

# Dense (non-sparse) peak FLOP/s from NVIDIA's data sheets, by a substring of the device name.
PEAK_FLOPS = {
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12},
    "H100 NVL": {"bf16": 835e12, "tf32": 417.5e12},
    "H100": {"bf16": 989.4e12, "tf32": 494.7e12},  # SXM (HBM3)
    "H200": {"bf16": 989.4e12, "tf32": 494.7e12},
    "A100": {"bf16": 312e12, "tf32": 156e12},
}

SMALL = {  # CPU-sized networks: the mnist preset's UNet at 3 channels, DiT-S/2 on 4x32x32 latents
    "ddpmpp-small": dict(CONFIGS["ddpmpp"], model_channels=32, channel_mult=[1, 2, 2], num_blocks=1,
                         attn_resolutions=[], dropout=0.0),
    "ddpmpp-tiny": dict(CONFIGS["ddpmpp"], img_resolution=16, model_channels=16, channel_mult=[1, 2],
                        num_blocks=1, attn_resolutions=[], dropout=0.0),
}
NETWORKS = {**CONFIGS, **SMALL}
LOSS = {  # the presets' loss and optimizer of each family
    "ddpmpp": (dict(group_size=4, k=15, a=1, b=5), dict(name="radam", lr=1e-4, betas=[0.9, 0.999], eps=1e-8,
                                                        weight_decay=0.0)),
    "dit": (dict(group_size=4, k=12, a=1, b=4, label_dropout=0.1), dict(name="adamw", lr=1e-4, betas=[0.9, 0.999],
                                                                      eps=1e-8, weight_decay=0.0)),
}
CASES = {  # name -> (network, batch, precision[+channels_last])
    "cuda": [("ddpmpp", 256, "tf32"), ("dit-xl2", 128, "bf16")],
    "cpu": [("ddpmpp-small", 32, "fp32"), ("ddpmpp-small", 32, "fp32+channels_last"), ("ddpmpp-small", 32, "bf16"),
            ("ddpmpp-small", 32, "bf16+channels_last"), ("dit-s2", 16, "fp32"), ("dit-s2", 16, "bf16")],
    "quick": [("ddpmpp-tiny", 8, "fp32"), ("ddpmpp-tiny", 8, "bf16+channels_last")],
}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(device, precision: str, n: int) -> float:
    """Achieved FLOP/s of an n x n x n matmul in the case's precision (bf16, or fp32 with TF32 allowed)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = median_seconds(lambda: a @ b, device, 3, 10)
    return 2 * n**3 / sec


def conv_rate(device, precision: str, memory_format, channels: int = 64, size: int = 32, batch: int = 64) -> float:
    """Achieved FLOP/s of a 3x3 convolution's forward and backward pass (3 x the forward's 2 B C^2 9 H W FLOPs)
    in the case's precision and layout."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device=device, dtype=dtype, memory_format=memory_format)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=memory_format).requires_grad_(True)
    sec = median_seconds(lambda: conv(x).sum().backward(), device, 2, 5)
    return 3 * 2 * batch * channels**2 * 9 * size**2 / sec


def device_peak(device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks["bf16" if precision == "bf16" else "tf32"]
    return None


class PassThrough(torch.nn.Module):
    """f(x) = w x with the real network's attributes: the IMM loss with (almost) no network cost."""

    def __init__(self, net):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        for key in ("noise_schedule", "T", "eps", "sigma_data", "label_dim", "f_type"):
            setattr(self, key, getattr(net, key))
        self.c_skip_c_out = net.c_skip_c_out

    def forward(self, x, t, s, class_labels=None, force_fp32=False, **kwargs):
        return x * self.w


def method_setup(method: str, family: str) -> tuple[dict, dict, dict, bool]:
    """(loss section, network settings, optimizer section, compilable) of ``method`` on a network ``family``: IMM
    with the family's preset loss, another method with its loss's defaults and the network settings the
    registry says it needs, all with the family's optimizer."""
    loss_cfg, opt_cfg = LOSS[family]
    if method != "imm":
        loss_cfg = {"kind": method}
    network = {key: value for key, value, _ in METHODS[method].network}
    return loss_cfg, network, opt_cfg, not cannot_train_with(method, "compile", True)


def bench_case(name: str, batch: int, precision: str, device, modes: list[str], repeats: int,
               checkpointing: bool = False, method: str = "imm") -> dict:
    """One case as the trainer runs it: bf16 in the fp32 network's bf16 working copy (the weights cast once per
    step, the gradients handed back to fp32: imm.training.step), ``+channels_last`` in that layout."""
    family = "dit" if name.startswith("dit") else "ddpmpp"
    loss_cfg, network_cfg, opt_cfg, compilable = method_setup(method, family)
    if not compilable:
        modes = ["eager"]
    dtype_name, _, layout = precision.partition("+")
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    net = imm.IMMNetwork(**{**NETWORKS[name], **network_cfg}).to(device).train().to(memory_format=memory_format)
    set_activation_checkpointing(net, checkpointing)
    compute = working_copy(net, torch.bfloat16, memory_format) if dtype_name == "bf16" else net
    sampler = sampling_network(net, compute.compute_dtype(), memory_format)
    pairs = [(p, c) for p, c in zip(net.parameters(), compute.parameters()) if p.requires_grad]
    loss_fn = build_loss(loss_cfg)
    opt = make_optimizer(net.parameters(), OptimizerSection(**opt_cfg))
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, device=device, generator=gen)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, net.label_dim, (batch,), device=device, generator=gen) if net.label_dim else None
    cfg_scale = 1.5 if net.label_dim else None
    row = {"case": name, "method": method, "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
           "batch": batch, "precision": precision, "cfg_scale": cfg_scale, "activation_checkpointing": checkpointing}

    def train_step(model):
        if compute is not net:
            copy_weights(compute, net)
        loss, _ = loss_fn(model, x, y, target_net=model, generator=gen)  # both passes compiled, as the trainer
        loss.backward()
        if compute is not net:
            move_gradients([p for p, _ in pairs], [c for _, c in pairs])
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample_step(model):
        with torch.no_grad():
            imm.sample(model, x * net.sigma_data, y, num_steps=1, cfg_scale=cfg_scale)

    # FLOPs of one eager training step and one sampling call (forward + backward of every op counted)
    with FlopCounterMode(display=False) as fc:
        train_step(compute)
    row["train_flops_per_sample"] = fc.get_total_flops() / batch
    sampler.eval()
    with FlopCounterMode(display=False) as fc:
        sample_step(sampler)
    row["sample_flops_per_image"] = fc.get_total_flops() / batch
    forward = row["sample_flops_per_image"] / (2 if cfg_scale else 1)  # guidance evaluates the batch twice
    row["forward_equivalents_counted"] = round(row["train_flops_per_sample"] / forward, 3)
    if round(row["forward_equivalents_counted"]) != METHODS[method].forward_equivalents:
        sys.exit(f"throughput.py: {method} on {name}: the FLOP counter counts {row['forward_equivalents_counted']} "
                 f"forward passes per sample, the registry {METHODS[method].forward_equivalents}")
    net.train()
    peak = device_peak(device, dtype_name)
    measured = matmul_rate(device, dtype_name, 8192 if device.type == "cuda" else 1024)
    conv = conv_rate(device, dtype_name, memory_format)
    row["matmul_tflops"] = round(measured / 1e12, 3)
    row["conv_tflops"] = round(conv / 1e12, 3)
    row["peak_tflops"] = None if peak is None else peak / 1e12

    # the loss alone: the same call on a pass-through network of the same shapes
    thru = PassThrough(net).to(device)
    loss_alone = median_seconds(lambda: loss_fn(thru, x, y, generator=gen)[0].backward(), device, 2, repeats)

    for mode in modes:
        model = torch.compile(compute) if mode == "compile" else compute
        sampling_model = torch.compile(sampler) if mode == "compile" else sampler
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        try:
            train_step(model)  # compiles in compile mode
        except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. torch 2.13's CPU inductor on the bf16 UNet
            row[mode] = {"error": str(e).strip().splitlines()[-1][:200]}
            print(f"{name} ({precision}), {mode}: torch.compile failed: {row[mode]['error']}", file=sys.stderr)
            continue
        sync(device)
        first = time.perf_counter() - start
        step = median_seconds(lambda: train_step(model), device, 1, repeats)
        r = {"train_samples_s": batch / step, "train_step_s": step, "first_step_s": first}
        r["train_mfu"] = row["train_flops_per_sample"] * batch / step / peak if peak else None
        r["train_of_matmul"] = row["train_flops_per_sample"] * batch / step / measured
        r["train_of_conv"] = row["train_flops_per_sample"] * batch / step / conv
        if device.type == "cuda":
            r["train_peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        sampler.eval()
        sample_step(sampling_model)
        sec = median_seconds(lambda: sample_step(sampling_model), device, 1, repeats)
        net.train()
        r["sample_img_s"] = batch / sec
        r["sample_mfu"] = row["sample_flops_per_image"] * batch / sec / peak if peak else None
        r["sample_of_matmul"] = row["sample_flops_per_image"] * batch / sec / measured
        if device.type == "cuda":
            r["sample_peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        r["loss_share"] = loss_alone / step
        row[mode] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    if len(modes) == 2 and "error" not in row["compile"]:
        row["compile_over_eager_train"] = round(row["eager"]["train_step_s"] / row["compile"]["train_step_s"], 3)
        row["compile_over_eager_sample"] = round(row["compile"]["sample_img_s"] / row["eager"]["sample_img_s"], 3)
    return row


def training_memory(name: str, batch: int, precision: str, device, checkpointing: bool, repeats: int) -> dict:
    """Peak memory of IMM training steps above what the process held before them (CUDA: allocated bytes;
    CPU: peak RSS, whose high-water mark only the steps can raise here), and the median step time."""
    family = "dit" if name.startswith("dit") else "ddpmpp"
    loss_cfg, opt_cfg = LOSS[family]
    torch.manual_seed(0)
    net = imm.IMMNetwork(**dict(NETWORKS[name], mixed_precision="bf16" if precision == "bf16" else None))
    net = net.to(device).train()
    set_activation_checkpointing(net, checkpointing)
    loss_fn, opt = build_loss(loss_cfg), make_optimizer(net.parameters(), OptimizerSection(**opt_cfg))
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, device=device, generator=gen)
    y = torch.randint(0, net.label_dim, (batch,), device=device, generator=gen) if net.label_dim else None

    def train_step():
        loss, _ = loss_fn(net, x, y, target_net=net, generator=gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def held() -> float:  # GiB
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    for p in net.parameters():  # the optimizer's state exists before the measured steps (zero grads: no change)
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = held()
    step = median_seconds(train_step, device, 1, repeats)
    return {"case": name, "batch": batch, "activation_checkpointing": checkpointing, "before_GiB": round(before, 3),
            "peak_GiB": round(held(), 3), "steps_GiB": round(held() - before, 3), "train_step_s": step}


def compare_checkpointing(args) -> int:
    """Each case, once plain and once with activation checkpointing, each in its own process (so that its peak
    memory is its own), alternating twice; the memory the training steps add, and the step-time ratio."""
    device_kind = "cuda" if args.device.startswith("cuda") else "cpu"
    known = {c[0]: c for c in CASES[device_kind]}
    print("| case | plain: steps add GiB | checkpointed: steps add GiB | memory ratio | step time ratio |")
    print("|---|---|---|---|---|")
    for case in args.cases or list(known):
        runs = {False: [], True: []}
        for ckpt in (False, True, False, True):
            cmd = [sys.executable, __file__, "--device", args.device, "--cases", case, "--memory-child",
                   "--repeats", str(args.repeats or 3), *(["--activation-checkpointing"] if ckpt else [])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[ckpt].append(json.loads(out.strip().splitlines()[-1]))
        mem = {k: statistics.median(r["steps_GiB"] for r in v) for k, v in runs.items()}
        step = {k: statistics.median(r["train_step_s"] for r in v) for k, v in runs.items()}
        print(f"| {case} (batch {runs[False][0]['batch']}) | {mem[False]:.3f} | {mem[True]:.3f} | "
              f"{mem[True] / mem[False]:.2f} | {step[True] / step[False]:.2f} |", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny UNet, eager only, few repeats")
    parser.add_argument("--no-compile", action="store_true", help="eager mode only")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per measurement (median)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON summary here")
    parser.add_argument("--cases", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated networks of {', '.join(NETWORKS)} (default: the device's cases)")
    parser.add_argument("--batch", type=int, default=None, help="batch of every case (default: the case's own)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["imm"],
                        help=f"comma-separated training methods of {', '.join(METHODS)}, each timed on every case "
                             "(default: imm)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in the backward pass")
    parser.add_argument("--compare-checkpointing", action="store_true",
                        help="peak memory and step time with and without activation checkpointing, per case")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cases and not set(args.cases) <= set(NETWORKS):
        parser.error(f"unknown case {sorted(set(args.cases) - set(NETWORKS))[0]!r}; choose from {', '.join(NETWORKS)}")
    if not set(args.methods) <= set(METHODS):
        unknown = sorted(set(args.methods) - set(METHODS))[0]
        parser.error(f"unknown method {unknown!r}; choose from {', '.join(METHODS)}")
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be a positive number of samples")
    if args.compare_checkpointing:
        return compare_checkpointing(args)
    if args.memory_child:
        table = CASES["cuda" if args.device.startswith("cuda") else "cpu"]
        name, batch, precision = next((c for c in table if c[0] == args.cases[0]), (args.cases[0], *table[0][1:]))
        print(json.dumps(training_memory(name, batch, precision, torch.device(args.device),
                                         args.activation_checkpointing, args.repeats or 3)))
        return 0
    device = torch.device(args.device)
    set_tf32(device)
    cases = CASES["quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")]
    if args.cases:  # the device's cases of that network (each precision), else the first case's batch and precision
        cases = [c for n in args.cases for c in ([c for c in cases if c[0] == n] or [(n, *cases[0][1:])])]
    modes = ["eager"] if (args.quick or args.no_compile) else ["eager", "compile"]
    repeats = args.repeats or (2 if args.quick else 5)
    rows = []
    for name, batch, precision in cases:
        for method in args.methods:
            if precision.endswith("+channels_last") and cannot_train_with(method, "memory_format", "channels_last"):
                print(f"{name} ({precision}), {method}: skipped, it cannot train channels_last", file=sys.stderr)
                continue
            rows.append(bench_case(name, args.batch or batch, precision, device, modes, repeats,
                                   args.activation_checkpointing, method))
            print(f"{name}, {method}: done", file=sys.stderr, flush=True)
    cols = ["forward_equivalents_counted", "train_samples_s", "train_mfu", "train_of_matmul", "train_of_conv",
            "sample_img_s", "sample_mfu", "sample_of_matmul", "loss_share", "train_peak_mem_GiB"]
    print("| case | method | mode | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for row in rows:
        for mode in [m for m in modes if m in row]:
            vals = [row.get(c, row[mode].get(c)) for c in cols]
            print(f"| {row['case']} (batch {row['batch']}, {row['precision']}) | {row['method']} | {mode} | "
                  + " | ".join("-" if v is None else f"{v:.3g}" for v in vals) + " |")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    summary = {"device": device_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "max_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "rows": rows}
    line = json.dumps(summary)
    print(line)
    if args.json_out:
        args.json_out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
