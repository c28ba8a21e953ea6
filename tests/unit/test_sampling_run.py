"""The sampling run resolved in one place: typed sampling entries and eval settings, the network's class
name, and imm generate / imm eval fid / the trainer's periodic FID drawing the same images."""

import json

import numpy as np
import pytest
import torch

from imm.cli import main
from imm.core.config import ConfigError
from imm.core.release import canonical
from imm.evaluation.evaluate import network_distances
from imm.evaluation.generate import draw, run
from imm.evaluation.sampling_run import (
    EvalSection,
    resolve_sampling_run,
    sampling_config,
    sampling_entries,
    step_entries,
)
from imm.model.sampling import SamplingEntry
from imm.training.config import load_train_config
from tests.helpers import FIXTURES

UNET = FIXTURES / "unet_cifar_like.pkl"


def test_release_entries_become_typed_entries():
    release = {"sampling": {"a": {"name": "restart_generator_fn", "num_steps": 2, "discretization": "edm"},
                            "b": {"name": "pushforward_generator_fn", "mid_nt": [1.4]}}}
    ours = {"sampling": {"a": {"kind": "restart", "num_steps": 2, "discretization": "edm"},
                         "b": {"kind": "pushforward", "mid_nt": [1.4]}}}
    assert canonical(release) == ours
    entries = sampling_entries(ours)
    assert entries["a"] == SamplingEntry(sampler="restart", num_steps=2, discretization="edm")
    assert entries["b"].kwargs() == {"sampler": "pushforward", "mid_nt": [1.4]}
    with pytest.raises(ConfigError, match="unknown sampling.a.kind 'euler'"):
        sampling_entries(canonical({"sampling": {"a": {"name": "euler"}}}))
    with pytest.raises(ConfigError, match="did you mean 'restart'"):
        sampling_entries({"sampling": {"a": {"kind": "restrat"}}})
    with pytest.raises(ConfigError, match="did you mean 'sampling.a.num_steps'"):
        sampling_entries({"sampling": {"a": {"num_step": 2}}})
    with pytest.raises(ConfigError, match="no sampling entries"):
        sampling_entries({})


def test_step_entries_and_guidance_replace_only_what_is_given():
    entries = step_entries([1, 4], cfg_scale=1.5)
    assert list(entries) == ["1_step", "4_steps"]
    assert entries["4_steps"].kwargs() == {"sampler": "pushforward", "num_steps": 4, "discretization": "uniform",
                                           "cfg_scale": 1.5}
    guided = SamplingEntry(mid_nt=[1.4], cfg_scale=2.0, cfg_interval=[0.1, 0.9])
    assert guided.with_guidance() == guided
    assert guided.with_guidance(cfg_interval=[0.2, 0.8]).kwargs() == {
        "sampler": "pushforward", "mid_nt": [1.4], "cfg_scale": 2.0, "cfg_interval": [0.2, 0.8]}


def test_eval_section_is_declared_once():
    assert EvalSection.from_config(None) == EvalSection(resume=None, seed=0, batch_size=64)
    assert EvalSection.from_config({"seed": None, "batch_size": 8}) == EvalSection(seed=0, batch_size=8)
    with pytest.raises(ConfigError, match="did you mean 'eval.batch_size'"):
        EvalSection.from_config({"batchsize": 8})
    with pytest.raises(ConfigError, match="eval.batch_size must be an integer from 1 to 65536, got 0"):
        EvalSection.from_config({"batch_size": 0})
    with pytest.raises(ConfigError, match="did you mean 'eval.seed'"):
        load_train_config("toy2d", ["+eval.sead=3"])
    with pytest.raises(ConfigError, match="did you mean 'sampling.2_steps.mid_nt'"):
        load_train_config("mnist", ["+sampling.2_steps.mid_n=[1.0]"])


def test_network_class_name_is_checked_not_dropped():
    assert canonical({"network": {"class_name": "training.preconds.IMMPrecond", "T": 0.9}}) == {"network": {"T": 0.9}}
    assert canonical({"network": {"class_name": "IMMNetwork"}}) == {"network": {}}
    with pytest.raises(ConfigError, match="network.class_name 'training.networks.SongUNet' is not an IMM network"):
        canonical({"network": {"class_name": "training.networks.SongUNet"}})
    with pytest.raises(ConfigError, match="is not an IMM network"):
        load_train_config("toy2d", ["+network.class_name=Other"])


def test_resolver_applies_the_eval_section_and_the_command_line():
    cfg, _ = sampling_config("cifar10", UNET, ["eval.seed=5", "eval.batch_size=3"])
    resolved = resolve_sampling_run(cfg, UNET, torch.device("cpu"), names=["2_steps"])
    assert (resolved.eval.seed, resolved.eval.batch_size, list(resolved.entries)) == (5, 3, ["2_steps"])
    resolved = resolve_sampling_run(cfg, UNET, torch.device("cpu"), steps=[1, 2], seed=7, batch_size=2)
    assert (resolved.eval.seed, resolved.eval.batch_size, list(resolved.entries)) == (7, 2, ["1_step", "2_steps"])
    with pytest.raises(ConfigError, match="unknown sampling entries"):
        resolve_sampling_run(cfg, UNET, torch.device("cpu"), names=["3_steps"])
    with pytest.raises(ConfigError, match="needs a class-conditional network"):
        resolve_sampling_run(cfg, UNET, torch.device("cpu"), cfg_scale=1.5)


def test_generate_and_fid_draw_the_same_images(tmp_path):
    """imm generate's PNGs and the images imm eval fid / the periodic FID measure come from one draw."""
    cfg, source = sampling_config("cifar10", UNET, [])
    run(cfg, UNET, tmp_path, {}, device="cpu", num_images=3, entries=["2_steps"], progress=False, seed=11,
        batch_size=2, source=source)
    written = np.load(tmp_path / "2_steps.npz")["arr_0"]
    resolved = resolve_sampling_run(cfg, UNET, torch.device("cpu"), names=["2_steps"], seed=11)
    drawn = draw(resolved, resolved.entries["2_steps"], [0, 1, 2])
    assert np.array_equal(drawn.permute(0, 2, 3, 1).numpy(), written)

    seen = []

    class Recorder:  # a feature network that keeps what it is shown
        def features(self, images, batch_size):
            seen.append(images.clone())
            return images.reshape(len(images), -1)[:, :4].float().numpy()

    ref = np.zeros(4), np.eye(4)
    network_distances(resolved.net, resolved.encoder, {"fid": (Recorder(), *ref)}, resolved.entries, 3, 3, 11,
                      torch.device("cpu"), progress=False, sample_fn=resolved.sample_fn)
    assert torch.equal(torch.cat(seen), drawn)
    settings = json.loads((tmp_path / "2_steps.settings.json").read_text())
    assert settings["sampling"] == resolved.entries["2_steps"].kwargs() and settings["seed"] == 11


def test_generate_accepts_the_release_network_class_name(tmp_path, capsys):
    args = ["generate", "--checkpoint", str(UNET), "--config", "cifar10", "--device", "cpu", "--entries", "1_step",
            "--batch-size", "1", "--out", str(tmp_path), "--no-progress"]
    assert main([*args, "network.class_name=training.preconds.IMMPrecond"]) == 0
    assert main([*args, "network.class_name=SongUNet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "network.class_name 'SongUNet' is not an IMM network" in err
