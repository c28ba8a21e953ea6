"""Post-hoc EMA (EDM2, Karras et al. 2024, Sec. 3 / App. C): the sigma_rel <-> gamma relation, the tracker's
profiles, snapshots during training (cadence, resume), least-squares reconstruction and `imm ema reconstruct`."""

import math

import pytest
import torch

import imm
from imm.cli import main
from imm.core.config import ConfigError
from imm.io.checkpoint import read_checkpoint
from imm.training import phema
from imm.training.checkpoints import load_latest_state
from imm.training.config import load_train_config
from imm.training.loop import TrainingError, train
from imm.training.phema_files import phema_snapshots, reconstruct_run
from tests.helpers import tiny_cfg, tracked


def distance(a: dict, b: dict) -> float:
    """L2 distance over the floating-point tensors of two state_dicts with the same keys."""
    assert a.keys() == b.keys()
    return math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a if a[k].is_floating_point()))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """160 steps tracking 0.05, 0.10 and (to compare with) 0.075 directly; snapshots every 10 steps."""
    run = tmp_path_factory.mktemp("phema") / "run"
    train(tiny_cfg("training.total_steps=160", "training.phema_sigma_rels=[0.05,0.10,0.075]",
                   "training.phema_snapshot_every=10"), run, device="cpu")
    return run


def test_sigma_rel_and_gamma_follow_the_papers_closed_form():
    for s in (1e-3, 0.01, 0.05, 0.075, 0.10, 0.2, 0.29, phema.SIGMA_REL_MAX):
        g = phema.sigma_rel_to_gamma(s)
        assert g >= phema.GAMMA_AT_WIDEST
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(s, rel=1e-12)
        assert phema.gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-12)
    for g in (-0.3, 0.0, 1.0, 6.94, 16.97, 100.0):
        assert phema.sigma_rel_to_gamma(phema.gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-9)
    assert phema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert phema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    assert phema.SIGMA_REL_MAX == pytest.approx(0.3003, abs=1e-4)
    for bad in (0.0, -0.1, 0.31, math.nan):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            phema.sigma_rel_to_gamma(bad)


def test_tracker_profile_has_the_width_it_is_named_for():
    """Track theta_t = (t, t^2) for 2000 steps: the EMA holds the profile's first two moments, so its
    standard deviation over the steps, divided by the steps, is sigma_rel (beta_t = (1 - 1/t)^(gamma + 1))."""
    net = torch.nn.Linear(2, 1, bias=False).double()
    tracker = phema.PowerEMA(net, [0.05, 0.2])
    steps = 2000
    for t in range(1, steps + 1):
        with torch.no_grad():
            net.weight.copy_(torch.tensor([[t, t * t]], dtype=torch.float64))
        tracker.update(net, t)
    for s, ema in tracker.emas.items():
        mean, mean_sq = ema.weight[0].tolist()
        assert math.sqrt(mean_sq - mean**2) / steps == pytest.approx(s, rel=2e-3)


def test_tracker_starts_from_the_first_steps_weights(tmp_path):
    """beta_1 = 0, so the initial weights never enter; step 2 weighs theta_2 by (2^(g+1) - 1) / 2^(g+1)."""
    net = torch.nn.Linear(3, 1, bias=False).double()
    tracker = phema.PowerEMA(net, [0.10])
    (ema,) = tracker.emas.values()
    for step, value in ((1, 1.0), (2, 3.0)):
        with torch.no_grad():
            net.weight.fill_(value)
        tracker.update(net, step)
        if step == 1:
            assert torch.equal(ema.weight, net.weight)
    w2 = 1 - 0.5 ** (phema.sigma_rel_to_gamma(0.10) + 1)
    assert torch.allclose(ema.weight, torch.full_like(ema.weight, 1 + 2 * w2), rtol=1e-12, atol=0)
    # the trainer counts its steps the same way: after one step every profile is the online network
    train(tiny_cfg("training.total_steps=1"), tmp_path / "run", device="cpu")
    _, state = load_latest_state(tmp_path / "run")
    for profile in state["phema"]["emas"].values():
        assert all(torch.equal(profile[k], state["model"][k]) for k in profile)


def test_reconstructing_a_tracked_profile_returns_its_weights(toy_run, tmp_path):
    paths = reconstruct_run(toy_run, [0.05, 0.10], tmp_path, progress=False)
    for s, path in zip((0.05, 0.10), paths):
        _, rebuilt = read_checkpoint(path)
        direct = tracked(toy_run, s)
        assert rebuilt.keys() == direct.keys()
        for k in direct:
            assert torch.allclose(rebuilt[k], direct[k], rtol=0, atol=1e-5), k
        # the snapshot of the last step is that profile too
        _, snapshot = read_checkpoint(toy_run / "phema" / f"phema-00000160-{s!r}.safetensors")
        assert all(torch.equal(snapshot[k], direct[k]) for k in direct)
    weights = phema.reconstruction_weights([100, 200, 200], [phema.sigma_rel_to_gamma(0.05)] * 2 + [3.0], 0.05)
    assert torch.allclose(weights, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-9)


def test_a_width_between_the_tracked_ones_is_closest_to_its_direct_ema(toy_run, tmp_path):
    run = tmp_path / "run"
    (run / "phema").mkdir(parents=True)
    for _, s, path in phema_snapshots(toy_run):  # 0.05 and 0.10 only
        if s != 0.075:
            (run / "phema" / path.name).write_bytes(path.read_bytes())
    (path,) = reconstruct_run(run, [0.075], tmp_path / "out", progress=False)
    _, rebuilt = read_checkpoint(path)
    direct = tracked(toy_run, 0.075)
    error = distance(rebuilt, direct)
    nearest = min(distance(tracked(toy_run, 0.05), direct), distance(tracked(toy_run, 0.10), direct))
    print(f"|reconstructed 0.075 - direct| = {error:.4g}; nearest tracked profile: {nearest:.4g}")
    assert error < 0.25 * nearest  # about 0.006 against 0.11


def test_snapshots_follow_the_cadence_across_a_resume(tmp_path):
    run = tmp_path / "run"
    common = ["training.phema_snapshot_every=3", "logging.checkpoint_every=4"]
    train(tiny_cfg("training.total_steps=5", *common), run, device="cpu")
    train(tiny_cfg("training.total_steps=10", *common), run, device="cpu")  # resumes at 5
    found = phema_snapshots(run)
    assert sorted((t, s) for t, s, _ in found) == [(t, s) for t in (3, 6, 9) for s in (0.05, 0.10)]
    assert len(list((run / "phema").iterdir())) == 2 * (10 // 3)  # nothing else is stored there
    assert imm.load_network(found[-1][2]).config["model_type"] == "MLP"  # an ordinary network file


def test_resumed_run_reconstructs_like_an_uninterrupted_one(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["training.phema_snapshot_every=2", "logging.checkpoint_every=4"]
    train(tiny_cfg("training.total_steps=12", *common), full, device="cpu")
    train(tiny_cfg("training.total_steps=6", *common), part, device="cpu")
    train(tiny_cfg("training.total_steps=12", *common), part, device="cpu")  # resumes at 6
    a = read_checkpoint(reconstruct_run(full, [0.07], tmp_path / "a", progress=False)[0])[1]
    b = read_checkpoint(reconstruct_run(part, [0.07], tmp_path / "b", progress=False)[0])[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a crash after step 12 with the last checkpoint at 8: the snapshots after 8 (10, 12) are gone on resume
    (part / "checkpoints" / "training-state-00000012.pt").unlink()
    orphan = part / "phema" / ".phema-00000012-0.05.safetensors.0123456789abcdef.tmp"
    orphan.write_bytes(b"torn")
    train(tiny_cfg("training.total_steps=10", *common), part, device="cpu")  # resumes at 8, stops at 10
    assert sorted({t for t, _, _ in phema_snapshots(part)}) == [2, 4, 6, 8, 10]
    assert not orphan.exists()


def test_resuming_without_phema_state_or_with_other_widths_is_one_error_line(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("training.total_steps=2", "training.phema=false"), run, device="cpu")
    with pytest.raises(TrainingError, match="has no post-hoc EMA state") as e:
        train(tiny_cfg("training.total_steps=4"), run, device="cpu")
    assert "\n" not in str(e.value) and "training-state-00000002.pt" in str(e.value)
    other = tmp_path / "other"
    train(tiny_cfg("training.total_steps=2"), other, device="cpu")
    with pytest.raises(TrainingError, match=r"tracks post-hoc EMA widths \[0.05, 0.1\]"):
        train(tiny_cfg("training.total_steps=4", "training.phema_sigma_rels=[0.05,0.2]"), other, device="cpu")
    for bad in ("training.phema_sigma_rels=[0.5]", "training.phema_snapshot_every=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            tiny_cfg(bad)


def test_cli_reconstruct_writes_networks_with_a_progress_bar(toy_run, tmp_path, capsys):
    out = tmp_path / "ema"
    assert main(["ema", "reconstruct", "--run-dir", str(toy_run), "--sigma-rel", "0.05,0.08", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.split("\n")[:2] == [f"wrote {out / 'phema-0.05.safetensors'}",
                                            f"wrote {out / 'phema-0.08.safetensors'}"]
    assert "imm ema reconstruct" in captured.err and "snapshot" in captured.err  # the tqdm bar, on stderr
    net = imm.load_network(out / "phema-0.08.safetensors")
    x = imm.sample(net, torch.randn(8, 2, 1, 1))
    assert x.shape == (8, 2, 1, 1) and torch.isfinite(x).all()
    _, tensors = read_checkpoint(out / "phema-0.05.safetensors")
    assert distance(tensors, tracked(toy_run, 0.05)) < 1e-5


@pytest.mark.parametrize("args,message", [
    (["--run-dir", "{tmp}/missing"], "missing: no such run directory"),
    (["--run-dir", "{tmp}"], "no post-hoc EMA snapshots"),
    (["--run-dir", "{run}", "--sigma-rel", "0.5"], "sigma_rel must be in (0, 0.3003]"),
    (["--run-dir", "{run}", "--sigma-rel", "0.05,wide"], "--sigma-rel takes comma-separated numbers"),
])
def test_cli_bad_input_is_one_error_line(toy_run, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, run=toy_run) for a in args]
    if "--sigma-rel" not in args:
        args += ["--sigma-rel", "0.05"]
    assert main(["ema", "reconstruct", *args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imm ema: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_eval_fid_sweeps_reconstructed_emas_and_plots_against_the_width(tmp_path, tiny_dinov2_dir, capsys):
    """`imm eval fid --checkpoint 'DIR/*.safetensors'`: each reconstructed EMA evaluated as a single
    checkpoint would be, a table over widths and a plot against sigma_rel (tiny mnist UNet, tiny DINOv2)."""
    import csv

    from imm.evaluation.evaluate import expand_checkpoints, reference_statistics

    dino = tiny_dinov2_dir
    cfg = load_train_config("mnist", ["network.model_channels=8", "training.batch_size=8", "training.total_steps=4",
                                      "logging.progress=false", "logging.tensorboard=false", "logging.sample_every=100",
                                      "training.phema=true", "training.phema_snapshot_every=1"])
    train(cfg, tmp_path / "run", device="cpu")
    assert main(["ema", "reconstruct", "--run-dir", str(tmp_path / "run"), "--sigma-rel", "0.05,0.2",
                 "--out", str(tmp_path / "ema"), "--no-progress"]) == 0
    ref = tmp_path / "ref.npz"
    with pytest.warns(UserWarning):
        reference_statistics("mnist", ref, max_images=8, device="cpu", metrics="fd_dinov2", dinov2=dino)
    common = ["--steps", "1,2", "--num-images", "4", "--ref", str(ref), "--device", "cpu",  # no --config: the
              "--metrics", "fd_dinov2", "--dinov2", str(dino), "--no-progress"]             # run's own settings
    capsys.readouterr()
    assert main(["eval", "fid", "--checkpoint", str(tmp_path / "ema" / "*.safetensors"),
                 "--out", str(tmp_path / "sweep"), *common]) == 0
    with open(tmp_path / "sweep" / "fid_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["sigma_rel"]), r["steps"]) for r in rows] == [(0.05, "1"), (0.05, "2"), (0.2, "1"), (0.2, "2")]
    assert (tmp_path / "sweep" / "fid_vs_ema_width.png").stat().st_size > 0
    # each checkpoint's numbers are those of evaluating it alone, and the two EMAs differ
    assert main(["eval", "fid", "--checkpoint", str(tmp_path / "ema" / "phema-0.2.safetensors"),
                 "--out", str(tmp_path / "one"), *common]) == 0
    with open(tmp_path / "one" / "fid.csv") as f:
        alone = [r["fd_dinov2"] for r in csv.DictReader(f)]
    assert [r["fd_dinov2"] for r in rows[2:]] == alone
    assert [r["fd_dinov2"] for r in rows[:2]] != alone
    # a pattern that matches nothing is one line
    capsys.readouterr()
    assert main(["eval", "fid", "--checkpoint", str(tmp_path / "none" / "*.safetensors"), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no file matches this pattern" in err, err
    assert expand_checkpoints(f"{tmp_path}/ema/phema-0.2.safetensors,{tmp_path}/ema/phema-0.05.safetensors") == [
        f"{tmp_path}/ema/phema-0.2.safetensors", f"{tmp_path}/ema/phema-0.05.safetensors"]
