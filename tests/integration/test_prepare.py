"""`imm prepare` to training: image archive, VAE latents with 2 gloo processes, a few steps of a tiny DiT."""

import json
import os
import subprocess

from PIL import Image

from imm.data.datasets import ImageFolderDataset
from imm.data.latents import stats_path_for
from tests.helpers import torchrun_command


def test_end_to_end_images_latents_torchrun_train(tmp_path, image_zip, tiny_vae_dir):
    """PNG zip -> latents with 2 gloo processes -> a few steps of a tiny DiT (imagenet256-dit-s preset)."""
    import imm
    from imm.training.config import load_train_config
    from imm.training.loop import train

    lat = tmp_path / "latents.zip"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = torchrun_command("-m", "imm", "prepare", "latents", "--source", str(image_zip), "--dest", str(lat), "--vae",
                           str(tiny_vae_dir), "--device", "cpu", "--shard-size", "10", "--batch-size", "8",
                           "--no-progress")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "encoder.raw_mean=[" in out.stdout and f"wrote {lat}" in out.stdout
    stats = json.loads(stats_path_for(lat).read_text())
    ds = ImageFolderDataset(lat)
    assert len(ds) == stats["count"] == len(ImageFolderDataset(image_zip))
    assert ds.raw_shape == (8, 8, 8) and ds.label_dim == 3
    fmt = lambda v: "[" + ",".join(f"{x:.6g}" for x in v) + "]"

    cfg = load_train_config("imagenet256-dit-s", [
        f"dataset.path={lat}", "resolution=8", "label_dim=3", f"encoder.vae_name={tiny_vae_dir}",
        f"encoder.raw_mean={fmt(stats['raw_mean'])}", f"encoder.raw_std={fmt(stats['raw_std'])}",
        "network.model_type=DiT", "network.depth=1", "network.hidden_size=32", "network.num_heads=2",
        "training.batch_size=8", "training.batch_per_device=8",
        "training.total_steps=2", "training.num_workers=0", "training.precision=fp32",
        "logging.sample_count=4", "logging.sample_steps=[1]", "logging.progress=false",
        "logging.tensorboard=false"])
    path = train(cfg, tmp_path / "run", device="cpu")
    assert imm.load_network(path).config["model_type"] == "DiT"
    grid = tmp_path / "run" / "samples" / "step00000002_1step.png"
    assert Image.open(grid).size == (2 * 18 + 2, 2 * 18 + 2)  # 4 decoded 16x16 samples, 2 per row
