"""``imm export diffusers`` and ``IMMPipeline``: the release-format fixtures sample their stored release outputs
through diffusers, a trained run samples what ``imm generate`` writes, and the folder round-trips."""

import json
import sys
import warnings

import numpy as np
import pytest
import torch

import imm
from imm.cli import main
from imm.evaluation.generate import seeded_inputs
from imm.interop.export import export_diffusers
from imm.training.loop import train
from tests.helpers import FIXTURES, digits_run, toy_cfg

pytest.importorskip("diffusers")
RELEASE = {"unet_cifar_like": "cifar10", "dit_imagenet_like": "imagenet256"}


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIXTURES / "manifest.json").read_text())


@pytest.mark.parametrize("name", RELEASE)
def test_release_fixtures_sample_their_release_outputs_through_diffusers(tmp_path, manifest, name):
    """Each official-format fixture, exported and reloaded, gives the stored outputs of the release's sampler
    for each of its entries (``pipe(**entry, latents=noise, class_labels=labels, output_type="latent")``)
    to 1e-4, and a perturbed weight moves them past it."""
    out = export_diffusers(FIXTURES / f"{name}.pkl", tmp_path / "pipe", config=RELEASE[name])
    pipe = imm.IMMPipeline.from_pretrained(out)
    data = np.load(FIXTURES / f"{name}.npz")
    labels = torch.from_numpy(data["labels"]) if data["labels"].size else None
    for entry, values in manifest[name]["sampling"].items():
        got = pipe(**values, latents=torch.from_numpy(data["noise"]), class_labels=labels, output_type="latent").images
        assert got.shape == data[entry].shape and (got - torch.from_numpy(data[entry])).abs().max() < 1e-4, entry
    with torch.no_grad():
        for parameter in pipe.network.parameters():
            parameter.add_(1e-3)
    got = pipe(**values, latents=torch.from_numpy(data["noise"]), class_labels=labels, output_type="latent").images
    assert (got - torch.from_numpy(data[entry])).abs().max() > 1e-4


def _generated(checkpoint, out, num_images: int = 4) -> np.ndarray:
    """What ``imm generate --num-images`` writes for each entry of ``checkpoint``: {entry: uint8 NHWC}."""
    assert main(["generate", "--checkpoint", str(checkpoint), "--out", str(out), "--num-images", str(num_images),
                 "--device", "cpu", "--no-progress", "--precision", "fp32"]) == 0
    return {p.stem: np.load(p)["arr_0"] for p in out.glob("*.npz")}


def test_a_trained_image_run_samples_what_imm_generate_writes(tmp_path):
    """An MNIST-shaped run (1-channel, class-conditional) exported from its run folder: each recorded entry,
    on imm generate's noise and labels, gives its PNGs' pixels exactly (``output_type="np"`` times 255)."""
    run = digits_run(tmp_path)
    pipe = imm.IMMPipeline.from_pretrained(export_diffusers(run, tmp_path / "pipe"))
    net = pipe.network.network
    assert net.label_dim == 3 and set(pipe.scheduler.entries) == {"1_step", "2_steps", "4_steps"}
    noise, labels = seeded_inputs(net, range(4), 0)
    generated = _generated(run / "network.safetensors", tmp_path / "gen")
    for entry, pixels in generated.items():
        images = pipe(entry=entry, latents=noise, class_labels=labels, output_type="np").images
        assert images.shape == (4, 8, 8, 1) and np.array_equal(np.rint(images * 255).astype(np.uint8), pixels), entry
    pil = pipe(entry="1_step", latents=noise, class_labels=labels).images
    assert [im.mode for im in pil] == ["L"] * 4
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), generated["1_step"][..., 0])


def test_a_toy_run_exports_and_samples_its_points(tmp_path):
    """A toy2d run (2-D points, identity encoder) samples what imm generate would from the same noise, as
    points; "pil" is refused in one line."""
    run = tmp_path / "run"
    train(toy_cfg("training.total_steps=3", "logging.log_every=1"), run, device="cpu")
    assert main(["export", "diffusers", str(run), str(tmp_path / "pipe")]) == 0
    pipe = imm.IMMPipeline.from_pretrained(tmp_path / "pipe")
    net = imm.load_network(run / "network.safetensors")
    noise, _ = seeded_inputs(net, range(16), 0)
    for steps in (1, 2):
        points = pipe(num_inference_steps=steps, latents=noise, output_type="pt").images
        expected = imm.sample(net, noise, num_steps=steps, discretization="uniform")
        assert torch.equal(points, expected)
    with pytest.raises(ValueError, match="2-D points, not images"):
        pipe(latents=noise)


@pytest.mark.parametrize("method", ["flow_matching", "consistency", "meanflow"])
def test_a_baseline_run_exports_with_its_own_sampler(tmp_path, method):
    """A flow-matching, consistency or MeanFlow run's pipeline samples each recorded entry with that method's
    sampler (imm generate's, imm.methods.registry.entry_sampler), the same draws from the same generator."""
    from imm.methods.registry import entry_sampler
    from imm.training.config import load_train_config
    from tests.helpers import TOY_QUIET

    path = train(load_train_config("toy2d", [*TOY_QUIET, f"loss.method={method}", "training.total_steps=2"]),
                 tmp_path / "run", device="cpu")
    pipe = imm.IMMPipeline.from_pretrained(export_diffusers(tmp_path / "run", tmp_path / "pipe"))
    assert pipe.scheduler.config.method == method
    net, noise = imm.load_network(path), torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    for name, entry in pipe.scheduler.entries.items():
        got = pipe(entry=name, latents=noise, generator=torch.Generator().manual_seed(5), output_type="latent").images
        expected = entry_sampler(method)(net, noise, None, generator=torch.Generator().manual_seed(5), **entry.kwargs())
        assert torch.equal(got, expected), name


def test_save_pretrained_round_trip_dtype_and_device(tmp_path):
    """save_pretrained -> from_pretrained keeps every weight and the scheduler's settings; torch_dtype and .to()
    behave as for a diffusers model."""
    out = export_diffusers(FIXTURES / "dit_imagenet_like.pkl", tmp_path / "a", config="imagenet256")
    pipe = imm.IMMPipeline.from_pretrained(out)
    pipe.save_pretrained(tmp_path / "b")
    again = imm.IMMPipeline.from_pretrained(tmp_path / "b")
    assert again.scheduler.config == pipe.scheduler.config and again.scheduler.config.method == "imm"
    for (k, v), (k2, v2) in zip(pipe.network.state_dict().items(), again.network.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert json.loads((out / "model_index.json").read_text())["network"] == ["imm.interop.diffusers_pipeline",
                                                                             "IMMNetworkModel"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers >= 0.37 prefers dtype= (older ones know only this)
        half = imm.IMMPipeline.from_pretrained(out, torch_dtype=torch.bfloat16)
    assert next(half.network.parameters()).dtype == torch.bfloat16
    assert half.to(torch.float32).network.dtype == torch.float32
    release = imm.load_network(FIXTURES / "dit_imagenet_like.pkl")
    assert again.network.network.config == json.loads(json.dumps(release.config))
    for kwargs, grid in (({"num_inference_steps": 4}, imm.time_grid(release, 4, "uniform")),
                         ({"num_inference_steps": 3, "discretization": "edm"}, imm.time_grid(release, 3, "edm")),
                         ({"mid_nt": [1.4]}, imm.time_grid(release, mid_nt=[1.4]))):
        again.scheduler.set_timesteps(**kwargs)  # the scheduler's schedule is the network's
        assert torch.equal(again.scheduler.timesteps, grid), kwargs


def test_bad_arguments_are_one_value_error(tmp_path):
    out = export_diffusers(FIXTURES / "dit_imagenet_like.pkl", tmp_path / "pipe", config="imagenet256")
    pipe = imm.IMMPipeline.from_pretrained(out)
    noise = torch.zeros(2, 4, 8, 8)
    cases = [(dict(output_type="jpeg"), "output_type must be one of"),
             (dict(class_labels=[0, 1000]), r"class_labels must lie in \[0, 10\)"),
             (dict(class_labels=[0]), "class_labels must be 2 integer class ids"),
             (dict(entry="nope"), "unknown sampling entry 'nope'"),
             (dict(num_steps=2, mid_nt=[0.5, 0.7]), "disagrees with mid_nt"),
             (dict(guidance_scale=2.0, cfg_scale=3.0), "differ"),
             (dict(latents=torch.zeros(2, 3, 8, 8)), r"latents must be a tensor \[B, 4, 8, 8\]"),
             (dict(num_steps=10**6), "num_steps must be an integer from 1 to 4096")]
    for kwargs, message in cases:
        kwargs = {"latents": noise, "output_type": "latent", **kwargs}
        with pytest.raises(ValueError, match=message) as info:
            pipe(**kwargs)
        assert "\n" not in str(info.value)


def test_export_refuses_to_overwrite_and_names_the_missing_extra(tmp_path, capsys, monkeypatch):
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    command = ["export", "diffusers", str(FIXTURES / "unet_cifar_like.pkl"), str(out)]
    assert main(command) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep"
    assert main([*command, "--overwrite"]) == 0 and not (out / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary folder left
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "imm.interop.diffusers_pipeline")
    capsys.readouterr()
    assert main([*command, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "imm[diffusers]"' in err, err


def test_a_latent_network_decodes_with_the_vae_it_carries_or_is_given(tmp_path, tiny_vae_dir):
    """The DiT fixture with a (tiny, local) VAE: the export copies it into the folder's vae component, and the
    pipeline decodes as imm generate does. A folder whose encoder names a VAE that is not a known Hub id and
    carries none is refused in one line, until the user passes the VAE."""
    from diffusers import AutoencoderKL

    checkpoint, vae = FIXTURES / "dit_imagenet_like.pkl", f"encoder.vae_name={tiny_vae_dir}"
    entry = "1_steps_cfg1.5_pushforward_uniform"
    assert main(["export", "diffusers", str(checkpoint), str(tmp_path / "pipe"), "--config", "imagenet256", vae]) == 0
    assert (tmp_path / "pipe" / "vae" / "config.json").is_file()
    assert main(["generate", "--checkpoint", str(checkpoint), "--config", "imagenet256", vae, "--entries", entry,
                 "--num-images", "2", "--out", str(tmp_path / "gen"), "--device", "cpu", "--no-progress",
                 "--precision", "fp32"]) == 0
    pixels = np.load(tmp_path / "gen" / f"{entry}.npz")["arr_0"]
    noise, labels = seeded_inputs(imm.load_network(checkpoint), range(2), 0)
    pipe = imm.IMMPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert pipe.encoder() is pipe.encoder()  # built once, not at every call
    images = pipe(entry=entry, latents=noise, class_labels=labels, output_type="np").images
    assert np.array_equal(np.rint(images * 255).astype(np.uint8), pixels)
    without = imm.IMMPipeline(network=pipe.network, scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="names the VAE .*tiny_vae.*not one of stabilityai/sd-vae-ft-ema") as info:
        without(entry=entry, latents=noise, class_labels=labels)
    assert "\n" not in str(info.value)
    given = imm.IMMPipeline.from_pretrained(tmp_path / "pipe", vae=AutoencoderKL.from_pretrained(tiny_vae_dir))
    images = given(entry=entry, latents=noise, class_labels=labels, output_type="np").images
    assert np.array_equal(np.rint(images * 255).astype(np.uint8), pixels)


# --- imm push ----------------------------------------------------------------------------------------------

def _pushed_run(tmp_path):
    """An MNIST-shaped run with the FIDs imm demo and the trainer's periodic FID write."""
    from imm.evaluation.evaluate import write_results
    from imm.training.config import LoggingSection
    from imm.training.logs import Logger

    run = digits_run(tmp_path, "logging.fid_num_images=64")
    write_results([{"steps": 1, "nfe": 1, "fid": 123.4, "num_images": 256, "seconds": 1.0}], run / "fid", ref="mnist")
    logger = Logger(run, LoggingSection(tensorboard=False), start_step=2)
    logger.scalars(2, {"fid/2step": 99.0})
    logger.close()
    return run


def test_push_dry_run_builds_the_repository_its_card_and_a_hub_cache_loads_it(tmp_path, capsys):
    """`imm push --dry-run` writes the network, the diffusers folder, config.yaml and a model card that parses
    back with its metadata and the run's FIDs; that folder, as a Hub cache snapshot, samples offline through
    `imm generate --checkpoint hf://OWNER/REPO` and `IMMPipeline.from_pretrained("OWNER/REPO")`."""
    import subprocess

    from huggingface_hub import ModelCard

    run = _pushed_run(tmp_path)
    repo = tmp_path / "repo"
    assert main(["push", str(run), "hf://me/imm-digits", "--dry-run", "--out", str(repo)]) == 0
    files = ["README.md", "config.yaml", "model_index.json", "network.safetensors", "network/config.json",
             "network/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"]
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()) == files
    out = capsys.readouterr().out
    assert all(f"  {name}\n" in out for name in files) and "dry run: wrote" in out
    card = ModelCard.load(repo / "README.md")
    assert card.data.library_name == "imm" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "unconditional-image-generation" and {"imm", "diffusers"} <= set(card.data.tags)
    for text in ("| 1 | 123.40 | 256 | `mnist` | fid/fid.json |", "| 2 | 99.00 | 64 |", "3 classes",
                 "imm generate --checkpoint hf://me/imm-digits", 'IMMPipeline.from_pretrained("me/imm-digits")',
                 "`training.total_steps`: 2"):
        assert text in card.text, text
    assert imm.load_network(repo / "network.safetensors").config == imm.load_network(run / "network.safetensors").config
    import shutil

    snapshot = tmp_path / "hf" / "hub" / "models--me--imm-digits"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("c" * 40)
    shutil.copytree(repo, snapshot / "snapshots" / ("c" * 40))
    script = ("import sys, numpy as np, torch; from imm import IMMPipeline; from imm.cli import main; "
              "assert main(['generate', '--checkpoint', 'hf://me/imm-digits', '--out', sys.argv[1], '--device', 'cpu',"
              " '--precision', 'fp32']) == 0; "
              "pipe = IMMPipeline.from_pretrained('me/imm-digits'); "
              "images = pipe(batch_size=4, entry='1_step').images; "  # README's lines
              "print(len(images), images[0].size)")
    env = {**__import__("os").environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "samples")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 (8, 8)" in done.stdout and (tmp_path / "samples" / "1_step_samples.png").is_file()


def test_push_uploads_one_commit_and_a_failure_is_one_line(tmp_path, capsys, monkeypatch):
    """Without --dry-run: create_repo, then one upload_folder of the same files (huggingface_hub's HfApi, its
    calls recorded here); a refused upload is one line naming the repository."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(
        ("create_repo", repo_id, kw["private"])))

    def upload_folder(self, repo_id, folder_path, **kw):
        calls.append(("upload_folder", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    checkpoint = FIXTURES / "unet_cifar_like.pkl"
    assert main(["push", str(checkpoint), "hf://me/cifar", "--private", "--config", "cifar10"]) == 0
    assert calls == [("create_repo", "me/cifar", True),
                     ("upload_folder", "me/cifar", ["README.md", "model_index.json", "network", "network.safetensors",
                                                    "scheduler"])]
    assert "pushed to https://huggingface.co/me/cifar in one commit" in capsys.readouterr().out

    def refuse(self, repo_id, **kw):
        raise PermissionError("401 Client Error: Unauthorized\nmore detail")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    assert main(["push", str(checkpoint), "hf://me/cifar", "--config", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pushing to hf://me/cifar failed (401 Client Error: Unauthorized)" in err, err
    assert main(["push", str(checkpoint), "me/cifar/extra"]) == 2
    assert "name the repository as hf://OWNER/REPO" in capsys.readouterr().err


def test_import_imm_does_not_import_diffusers():
    import subprocess

    script = "import sys, imm; assert 'diffusers' not in sys.modules; imm.IMMPipeline; assert 'diffusers' in sys.modules"
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 0
