"""``imm explore``'s model (:class:`imm.interop.explore.Explorer`) and page requests: the samples are those of
``imm generate``'s seeding and sampler, every request is capped, and a bad value is a message, not a traceback."""

import numpy as np
import pytest
import torch

import imm
from imm.evaluation.generate import seeded_inputs
from imm.interop.explore import LIMITS, UNIFORM, ExploreError, Explorer, panel_request
from imm.io.images import grid_array
from imm.training.loop import train
from tests.helpers import FIXTURES, digits_run, toy_cfg


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A class-conditional, 1-channel 8 x 8 run (two steps of training) and its explorer."""
    return Explorer(digits_run(tmp_path_factory.mktemp("explore")))


def test_samples_are_imm_generates_draws(digits):
    """Seed s, n images: image i from seed s + i (noise and label), the method's sampler, decoded to pixels."""
    entry = digits.entry(UNIFORM, 2)
    got = digits.sample(entry, seed=7, count=4)
    net = digits.net
    noise, labels = seeded_inputs(net, range(4), 7)
    x = imm.sample(net, noise, labels, num_steps=2, discretization="uniform")
    expected = grid_array(digits.run.encoder.decode(x))
    assert np.array_equal(np.asarray(got.image), expected[:, :, 0]) and got.nfe == 2
    assert got.caption.startswith("4 samples, 2 steps, classes ") and got.seconds_per_image > 0
    chosen = digits.sample(entry, seed=7, count=4, labels_text="2, 0")
    x = imm.sample(net, noise, torch.tensor([2, 0, 2, 0]), num_steps=2, discretization="uniform")
    assert np.array_equal(np.asarray(chosen.image), grid_array(digits.run.encoder.decode(x))[:, :, 0])


def test_entries_middle_time_and_guidance(digits):
    assert digits.entry("2_steps", 5) == digits.entries["2_steps"]  # a recorded entry ignores the step slider
    mid = digits.entry(UNIFORM, 2, mid_t=0.6)
    assert mid.num_steps == 2 and mid.mid_nt == pytest.approx((float(digits.net.eta(torch.tensor(0.6))),))
    assert digits.entry(UNIFORM, 3, mid_t=0.6) == digits.entry(UNIFORM, 3)  # a middle time is a 2-step setting
    guided = digits.entry(UNIFORM, 4, cfg_scale=2.0, cfg_interval=(0.2, 0.8))
    assert guided.cfg_scale == 2.0 and guided.cfg_interval == (0.2, 0.8)
    # step start times 0.994, 0.747, 0.5, 0.253: three inside [0.2, 0.8], guided on a doubled batch
    assert digits.sample(guided, 0, 2).nfe == 1 + 3 * 2


@pytest.mark.parametrize("settings, message", [
    (dict(steps=9), "steps must be an integer from 1 to 8"),
    (dict(steps=2.5), "steps must be an integer from 1 to 8"),
    (dict(count=65), "the image count must be an integer from 1 to 64"),
    (dict(count="many"), "the image count must be an integer"),
    (dict(seed=-1), "the seed must be an integer from 0 to 2147483647"),
    (dict(mid_t=1.5, use_mid_t=True), "the middle time must be a number between"),
    (dict(cfg_lo=0.9, cfg_hi=0.1, use_cfg=True), "the guidance interval [0.9, 0.1] is empty"),
    (dict(cfg_scale=float("nan"), use_cfg=True), "the guidance scale must be a number"),
    (dict(labels="3, x"), "class labels are integers from 0 to 2"),
    (dict(labels="7"), "class labels are 1 to 64 integers from 0 to 2"),
    (dict(choice="nope"), "unknown sampling entry 'nope'"),
])
def test_a_bad_value_is_a_message_on_the_page(digits, settings, message):
    values = dict(choice=UNIFORM, steps=2, mid_t=0.5, use_mid_t=False, cfg_scale=1.5, use_cfg=False, cfg_lo=0.0,
                  cfg_hi=1.0, labels="", seed=0, count=4)
    values.update(settings)
    image, caption = panel_request(digits, *values.values())
    assert image is None and caption.startswith("**Not sampled**") and message in caption, caption
    assert "\n" not in caption and "Traceback" not in caption


def test_limits_are_the_documented_caps():
    assert LIMITS == {"images": 64, "steps": 8, "seed": 2**31 - 1}


def test_unconditional_release_network_refuses_guidance_and_labels():
    explorer = Explorer(FIXTURES / "unet_cifar_like.pkl", config="cifar10")
    assert not explorer.conditional and list(explorer.entries) == ["1_step", "2_steps"]
    with pytest.raises(ExploreError, match="guidance needs a class-conditional network"):
        explorer.entry(UNIFORM, 2, cfg_scale=2.0)
    with pytest.raises(ExploreError, match="class labels need a class-conditional network"):
        explorer.sample(explorer.entry(UNIFORM, 1), 0, 2, labels_text="1")
    got = explorer.sample(explorer.entries["2_steps"], 0, 3)
    assert got.image.size == (2 + 18, 2 + 3 * 18) and got.nfe == 2  # 3 images of 16 px, one per row, 2 px apart


def test_a_toy_run_shows_its_points_over_the_target(tmp_path):
    train(toy_cfg("training.total_steps=2", "logging.log_every=1"), tmp_path / "run", device="cpu")
    explorer = Explorer(tmp_path / "run")
    assert explorer.points and explorer.toy_target
    got = explorer.sample(explorer.entry(UNIFORM, 1), 0, 64)
    assert got.image.mode == "RGB" and got.image.size[0] > 100 and got.caption == "64 samples, 1 step" and got.nfe == 1


def test_a_latent_network_without_its_vae_says_what_to_pass(monkeypatch):
    """The DiT fixture names a VAE that is not here (offline): the page says so instead of sampling."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    explorer = Explorer(FIXTURES / "dit_imagenet_like.pkl", config="imagenet256")
    assert explorer.encoder_problem and "sd-vae-ft-ema" in explorer.encoder_problem
    image, caption = panel_request(explorer, UNIFORM, 1, 0.5, False, 1.5, False, 0.0, 1.0, "", 0, 2)
    assert image is None and "cannot be decoded" in caption and "vae_name" in caption


def test_a_panel_shows_the_grid_enlarged_with_its_nfe_and_time(digits):
    """The page scales a small grid up by a whole factor (nearest neighbour) and leads with the NFE."""
    image, caption = panel_request(digits, UNIFORM, 3, 0.5, False, 1.5, False, 0.0, 1.0, "", 0, 4)
    exact = digits.sample(digits.entry(UNIFORM, 3), 0, 4).image  # 2 x 2 images of 8 px, 2 px apart: 22 px wide
    assert image.size == (22 * 17, 22 * 17) and np.array_equal(np.asarray(image)[::17, ::17], np.asarray(exact))
    assert caption.startswith("**3 NFE**, ") and "ms per image: 4 samples, 3 steps, classes" in caption


@pytest.mark.parametrize("stop, fetch", [("SIGINT", True), ("SIGTERM", True), ("SIGINT", False), ("SIGTERM", False)])
def test_the_server_stops_cleanly_on_ctrl_c_and_sigterm(tmp_path, stop, fetch):
    """`imm explore` serves on 127.0.0.1, answers, and a Ctrl-C (SIGINT) or SIGTERM closes it: exit 0, no traceback;
    also a signal sent the moment the address is printed (without fetching the page first)."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from tests.helpers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imm", "explore", "--checkpoint", str(FIXTURES / "unet_cifar_like.pkl"),
                             "--config", "cifar10", "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # SIGABRT prints every thread's stack
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"imm explore: serving http://127.0.0.1:{port}/ (Ctrl-C stops it)", line
        if fetch:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as page:
                assert page.status == 200 and b"<html" in page.read(2000)
        proc.send_signal(getattr(signal, stop))
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            pytest.fail(f"imm explore still runs 60 s after {stop}; its threads:\n{proc.communicate()[1][-6000:]}")
    finally:
        proc.kill()
    assert proc.returncode == 0 and "imm explore: stopped" in out and "Traceback" not in err, err[-2000:]


def test_a_latent_network_decodes_through_its_vae_and_the_network_is_held_once(tiny_vae_dir):
    explorer = Explorer(FIXTURES / "dit_imagenet_like.pkl", config="imagenet256",
                        overrides=[f"encoder.vae_name={tiny_vae_dir}"])
    assert explorer.encoder_problem is None and explorer.run.sampling_net is explorer.net
    got = explorer.sample(explorer.entry(UNIFORM, 1, cfg_scale=1.5), 0, 4, "1, 2")
    assert got.image.mode == "RGB" and got.image.size == (2 + 2 * 18, 2 + 2 * 18)  # 8 x 8 latents, 16 x 16 pixels
    assert got.nfe == 2 and "classes [1, 2, 1, 2]" in got.caption


def test_a_baseline_checkpoint_samples_with_its_own_sampler(tmp_path):
    from imm.methods.registry import entry_sampler
    from imm.training.config import load_train_config
    from tests.helpers import TOY_QUIET

    train(load_train_config("toy2d", [*TOY_QUIET, "loss.method=flow_matching", "training.total_steps=2"]),
          tmp_path / "run", device="cpu")
    explorer = Explorer(tmp_path / "run")
    assert explorer.method == "flow_matching"
    entry = explorer.entry(UNIFORM, 2)
    noise, _ = seeded_inputs(explorer.net, range(8), 3)
    expected = entry_sampler("flow_matching")(explorer.net, noise, None, generator=torch.Generator().manual_seed(3),
                                              **entry.kwargs())
    calls = []
    real = explorer._scatter
    explorer._scatter = lambda points: calls.append(points) or real(points)
    explorer.sample(entry, 3, 8)
    assert torch.equal(calls[0], explorer.run.encoder.decode(expected))
