"""MeanFlow through the trainer: it learns toy2d at one step, 2 gloo processes train like 1, and its checkpoint
samples through `imm generate` and `imm eval fid` with nothing but the file."""

import json

import pytest
import torch

import imm
from imm import cli
from imm.data.datasets import toy2d_sample
from imm.evaluation.toy_metrics import sliced_wasserstein
from imm.io.checkpoint import read_sampling_settings
from imm.methods import registry as methods
from imm.model.sampling import SamplingEntry
from imm.training.config import load_train_config
from imm.training.loop import train
from tests.helpers import TOY_QUIET, toy_cfg
from tests.integration.test_train import MULTI, assert_trained_alike, finished, torchrun


def test_meanflow_learns_toy2d_at_one_step(tmp_path):
    """1-step samples of 300 MeanFlow steps are far closer to the 8 modes than the untrained network's (sliced
    W2: 0.48 at initialisation -> 0.13)."""
    cfg = load_train_config("toy2d", ["loss.kind=meanflow", "training.total_steps=300", "training.batch_size=256",
                                      *TOY_QUIET])
    path = train(cfg, tmp_path / "run", device="cpu")
    net = imm.load_network(path)
    torch.manual_seed(0)
    init = imm.IMMNetwork(**net.config).eval()
    target = toy2d_sample("gaussians8", 4000, torch.Generator().manual_seed(1))
    x_T = torch.randn(4000, 2, 1, 1, generator=torch.Generator().manual_seed(2))
    sample, entry = methods.entry_sampler("meanflow"), SamplingEntry.uniform(1).kwargs()
    d = {name: sliced_wasserstein(sample(n, x_T, **entry), target, generator=torch.Generator().manual_seed(3))
         for name, n in (("init", init), ("trained", net))}
    assert d["trained"] < 0.6 * d["init"], d
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/nonfinite_groups"] == 0 for r in rows if "train/loss" in r)


def test_two_processes_equal_one_process(tmp_path):
    """The JVP runs outside DDP, and the trainer averages the gradients itself: 2 gloo processes x 1 chunk of 16
    train like 1 process x 2 accumulated chunks of 16."""
    train(toy_cfg("training.total_steps=4", *MULTI, "loss.kind=meanflow"), tmp_path / "one", device="cpu")
    finished(torchrun(tmp_path / "two", 4, "loss.kind=meanflow"))
    assert_trained_alike(tmp_path / "one", tmp_path / "two", 4)
    # and not like a run whose processes never exchanged their gradients
    train(toy_cfg("training.total_steps=4", "training.batch_size=16", "logging.checkpoint_every=100",
                  "loss.kind=meanflow"), tmp_path / "half", device="cpu")
    with pytest.raises(AssertionError):
        assert_trained_alike(tmp_path / "half", tmp_path / "two", 4)


@pytest.mark.filterwarnings("ignore:only 4 images")  # small-N bias: expected here
def test_a_meanflow_checkpoint_samples_through_the_cli_without_a_config(tmp_path, capsys):
    """An mnist MeanFlow run in bf16 (the method table's precision): the checkpoint records loss.kind=meanflow,
    `imm generate` writes its entries' grids and `imm eval fid` measures it from the file alone."""
    ref = tmp_path / "ref.npz"
    assert cli.main(["eval", "ref", "--data", "mnist", "--max-images", "8", "--out", str(ref), "--no-progress"]) == 0
    cfg = load_train_config("mnist", [
        "loss.kind=meanflow", "network.f_type=euler_fm", "network.temb_type=stride", "network.model_channels=8",
        "training.batch_size=8", "training.total_steps=2", "training.precision=bf16", "+dataset.max_size=64",
        "logging.progress=false", "logging.tensorboard=false", "logging.sample_count=4"])
    path = train(cfg, tmp_path / "run", device="cpu")
    assert read_sampling_settings(path)["loss"] == {"kind": "meanflow"}
    assert cli.main(["generate", "--checkpoint", str(path), "--out", str(tmp_path / "gen"), "--device", "cpu",
                     "eval.batch_size=4"]) == 0
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.png")) == sorted(f"{e}_samples.png" for e in cfg["sampling"])
    capsys.readouterr()
    assert cli.main(["eval", "fid", "--checkpoint", str(path), "--steps", "1,2", "--num-images", "4", "--ref", str(ref),
                     "--out", str(tmp_path / "fid"), "--device", "cpu", "--no-progress"]) == 0
    assert "1_step: steps=1 nfe=1 fid=" in capsys.readouterr().out
    results = json.loads((tmp_path / "fid" / "fid.json").read_text())["results"]
    assert [(r["steps"], r["nfe"]) for r in results] == [(1, 1), (2, 2)] and all(r["fid"] > 0 for r in results)
