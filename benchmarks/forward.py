"""Forward-pass throughput of the IMM networks, eager vs torch.compile, measured side by side.

    python benchmarks/forward.py                          # CPU: DDPM++ CIFAR-10 and DiT-S/2, batch 8
    python benchmarks/forward.py --device cuda --batch 128 --models ddpmpp,dit-s2,dit-xl2 --dtype bf16

For each network (the released configurations, random weights) it times one-step sampling
forwards f_{s,t}(x) (the wrapper included) in eager mode and, unless --no-compile, compiled with
torch.compile, and prints images/s and the compiled/eager ratio as a table and one JSON line.
Eager and compiled runs of one model alternate in the same process, so the ratio is measured under
the same machine load.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from imm.precond import IMMNetwork

CONFIGS = {
    # the release's CIFAR-10 DDPM++ (cifar10.pt), 56M parameters
    "ddpmpp": dict(img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet",
                   embedding_type="positional", encoder_type="standard", decoder_type="standard",
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                   s_embed=True, dropout=0.2, noise_schedule="fm", f_type="simple_edm", temb_type="identity",
                   eps=0.006, T=0.994),
    # ImageNet-256 latents (4x32x32), class-conditional DiTs
    "dit-s2": dict(img_resolution=32, img_channels=4, label_dim=1000, model_type="DiT_S_2", s_embed=True,
                   noise_schedule="fm", f_type="euler_fm", temb_type="stride"),
    "dit-xl2": dict(img_resolution=32, img_channels=4, label_dim=1000, model_type="DiT_XL_2", s_embed=True,
                    noise_schedule="fm", f_type="euler_fm", temb_type="stride"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(fn, args, device, warmup: int, repeats: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn(*args)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, batch: int, device, dtype: str | None, compile_: bool, warmup: int, repeats: int) -> dict:
    cfg = dict(CONFIGS[name], mixed_precision=dtype)
    torch.manual_seed(0)
    net = IMMNetwork(**cfg).to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, device=device) * 0.5
    t = torch.full((batch,), 0.994, device=device)
    s = torch.zeros(batch, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device) if net.label_dim else None
    args = (x, t, s, labels)
    row = {"model": name, "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2), "batch": batch}
    with torch.no_grad():
        eager = time_forward(net, args, device, warmup, repeats)
        row["eager_img_s"] = round(batch / eager, 2)
        if compile_:
            compiled = torch.compile(net)
            start = time.perf_counter()
            compiled(*args)
            _sync(device)
            row["compile_s"] = round(time.perf_counter() - start, 1)
            # alternate eager and compiled timings so both see the same machine load
            eager_t, comp_t = [], []
            for _ in range(3):
                eager_t.append(time_forward(net, args, device, 1, max(1, repeats // 3)))
                comp_t.append(time_forward(compiled, args, device, 1, max(1, repeats // 3)))
            row["eager_img_s"] = round(batch / statistics.median(eager_t), 2)
            row["compiled_img_s"] = round(batch / statistics.median(comp_t), 2)
            row["compiled_over_eager"] = round(statistics.median(eager_t) / statistics.median(comp_t), 3)
    if device.type == "cuda":
        row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", default="ddpmpp,dit-s2", help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--dtype", default=None, choices=[None, "bf16", "fp16"], help="autocast (default fp32)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = [bench_model(m, args.batch, device, args.dtype, not args.no_compile, args.warmup, args.repeats)
            for m in args.models.split(",")]
    header = ["model", "params_M", "batch", "eager_img_s", "compiled_img_s", "compiled_over_eager", "compile_s"]
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(r.get(h, "-")) for h in header))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(json.dumps({"device": device_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "dtype": args.dtype or "fp32", "rows": rows}))


if __name__ == "__main__":
    main()
