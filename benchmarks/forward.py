"""Forward-pass throughput of the IMM networks, eager vs torch.compile, and ours vs the release's way.

    python benchmarks/forward.py                          # CPU: DDPM++ CIFAR-10 and DiT-S/2, batch 8
    python benchmarks/forward.py --device cuda --batch 128 --models ddpmpp,dit-s2,dit-xl2 --dtype bf16
    python benchmarks/forward.py --against-release --rounds 9 --no-compile   # ours / release, eager

For each network (the released configurations, random weights) it times one-step sampling
forwards f_{s,t}(x) (the wrapper included) in eager mode and, unless --no-compile, compiled with
torch.compile, and prints images/s and the compiled/eager ratio as a table and one JSON line.
Eager and compiled runs of one model alternate in the same process, so the ratio is measured under
the same machine load.

``--against-release`` times our network against a reference that computes the same network, with the
same weights, the way the official release's code does (:func:`release_style`): the DDPM++ blocks with
in-place residual additions and the release's attention (two einsums with the softmax in float32, in
place of ``scaled_dot_product_attention``), DiT with timm's attention formulation, one-hot labels turned
into indices by argmax, and the einsum unpatchify. It is our own code following the release's files
(``training/unets.py``, ``training/dit.py`` of github.com/lumalabs/imm), checked to give the same
outputs before it is timed. The two are timed in alternation, A B A B, ``--rounds`` times, and the
ratio of the medians is reported (> 1: ours is slower).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import statistics
import time
import types

import torch
import torch.nn.functional as F

from imm.core.distributed import set_tf32
from imm.model.backbones.dit import Attention as DiTAttention
from imm.model.backbones.dit import DiT
from imm.model.backbones.unet import UNetBlock
from imm.model.network import IMMNetwork

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


# ---------------------------------------------------------------------------------------------
# The release's way of computing the same networks (a reference for timing; see the module docstring)


def _release_unet_block(self, x, emb):
    """A DDPM++ block as the release computes it: the residual sums in place, attention weights from
    q^T k / sqrt(C) by einsum with the softmax in float32, then an einsum with v."""
    orig = x
    x = self.conv0(F.silu(self.norm0(x)))
    params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
    if self.adaptive_scale:
        scale, shift = params.chunk(2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
    else:
        x = F.silu(self.norm1(x.add_(params)))
    x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
    x = x.add_(self.skip(orig) if self.skip is not None else orig) * self.skip_scale
    if self.num_heads:
        n, c = x.shape[0] * self.num_heads, x.shape[1] // self.num_heads
        q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, -1).unbind(2)
        weights = torch.einsum("ncq,nck->nqk", q.float(), (k / math.sqrt(c)).float()).softmax(dim=2).to(q.dtype)
        x = self.proj(torch.einsum("nqk,nck->ncq", weights, v).reshape(*x.shape)).add_(x) * self.skip_scale
    return x


def _release_attention(self, x):
    """timm's ``Attention`` (the fused path the release gets with torch >= 2): reshape, permute, unbind."""
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))


def _release_unpatchify(self, x):
    c, p = self.out_channels, self.patch_size
    h = w = int(x.shape[1] ** 0.5)
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
    return x.reshape(x.shape[0], c, h * p, w * p)


def release_style(net: IMMNetwork) -> IMMNetwork:
    """A copy of ``net`` (same weights) whose blocks compute the way the release's code does."""
    ref = copy.deepcopy(net)
    for module in ref.modules():
        if isinstance(module, UNetBlock):
            module.forward = types.MethodType(_release_unet_block, module)
        elif isinstance(module, DiTAttention):
            module.forward = types.MethodType(_release_attention, module)
        elif isinstance(module, DiT):
            module.unpatchify = types.MethodType(_release_unpatchify, module)
    return ref


def bench_against_release(name: str, batch: int, device, rounds: int, repeats: int) -> dict:
    """Our network and :func:`release_style` of it, eager, timed in alternation; medians over the rounds."""
    torch.manual_seed(0)
    net = IMMNetwork(**CONFIGS[name]).to(device).eval().requires_grad_(False)
    ref = release_style(net)
    args = _inputs(net, batch, device)
    if net.label_dim:  # the release's ImageNet sampling: classifier-free guidance 1.5
        net, ref = (functools.partial(m, cfg_scale=1.5) for m in (net, ref))
    with torch.no_grad():
        ours_out, ref_out = net(*args), ref(*args)
        scale = ref_out.abs().max().item() or 1.0
        max_diff = (ours_out - ref_out).abs().max().item() / scale
        if not max_diff < 1e-4:
            raise SystemExit(f"forward.py: {name}: the reference disagrees with ours (relative {max_diff:.2e})")
        ours_t, ref_t = [], []
        for i in range(rounds):  # A B A B ..., the first of each pair alternating too
            pair = [(ours_t, net), (ref_t, ref)] if i % 2 == 0 else [(ref_t, ref), (ours_t, net)]
            for times, model in pair:
                times.append(time_forward(model, args, device, 1, repeats))
    ours, release = statistics.median(ours_t), statistics.median(ref_t)
    return {"model": name, "batch": batch, "rounds": rounds, "ours_ms": round(1e3 * ours, 1),
            "release_ms": round(1e3 * release, 1), "ours_over_release": round(ours / release, 3),
            "spread_ours_ms": [round(1e3 * min(ours_t), 1), round(1e3 * max(ours_t), 1)],
            "spread_release_ms": [round(1e3 * min(ref_t), 1), round(1e3 * max(ref_t), 1)],
            "max_rel_diff": float(f"{max_diff:.1e}")}


def _inputs(net: IMMNetwork, batch: int, device) -> tuple:
    """(x, t, s, labels) of a one-step sampling forward; DiT configs get CFG-style one-hot labels."""
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, device=device) * 0.5
    t = torch.full((batch,), 0.994, device=device)
    s = torch.zeros(batch, device=device)
    labels = torch.randint(0, net.label_dim, (batch,), device=device) if net.label_dim else None
    return x, t, s, labels


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
    args = _inputs(net, batch, device)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", default="ddpmpp,dit-s2", help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--dtype", default=None, choices=[None, "bf16", "fp16"], help="autocast (default fp32)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6, help="calls per timing (its median is the timing)")
    parser.add_argument("--against-release", action="store_true",
                        help="time ours against the release's way of computing the same network (eager, fp32)")
    parser.add_argument("--rounds", type=int, default=9, help="--against-release: A B timing pairs")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    set_tf32(device)
    models = args.models.split(",")
    if args.against_release:
        rows = [bench_against_release(m, args.batch, device, args.rounds, args.repeats) for m in models]
        header = ["model", "batch", "ours_ms", "release_ms", "ours_over_release", "spread_ours_ms",
                  "spread_release_ms", "max_rel_diff"]
    else:
        rows = [bench_model(m, args.batch, device, args.dtype, not args.no_compile, args.warmup, args.repeats)
                for m in models]
        header = ["model", "params_M", "batch", "eager_img_s", "compiled_img_s", "compiled_over_eager", "compile_s"]
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(r.get(h, "-")) for h in header))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(json.dumps({"device": device_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "dtype": args.dtype or "fp32", "rows": rows}))


if __name__ == "__main__":
    main()
