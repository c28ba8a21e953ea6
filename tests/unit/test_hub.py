"""hf://OWNER/REPO/PATH[@REVISION] checkpoint paths, read from a Hugging Face cache built in a temporary
folder (the cache's own layout); nothing here touches the network."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import imm
from imm.io import hub
from imm.io.checkpoint import CheckpointError
from tests.helpers import FIXTURES

MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """$HF_HOME/hub with lumaai/imm: cifar10.pt (the UNet fixture) at main, and the DiT fixture under the
    same name at the tag v1."""
    from huggingface_hub import constants

    repo = tmp_path / "hf" / "hub" / "models--lumaai--imm"
    for commit, fixture in ((MAIN, "unet_cifar_like.pkl"), (V1, "dit_imagenet_like.pkl")):
        (repo / "snapshots" / commit).mkdir(parents=True)
        shutil.copy(FIXTURES / fixture, repo / "snapshots" / commit / "cifar10.pt")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf"


def test_hub_paths_load_from_the_cache_at_a_revision(hub_cache):
    net = imm.load_network("hf://lumaai/imm/cifar10.pt")
    local = imm.load_network(FIXTURES / "unet_cifar_like.pkl")
    assert net.config == local.config
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), local.state_dict().values()))
    tagged = imm.load_network("hf://lumaai/imm/cifar10.pt@v1")
    assert tagged.config["model_type"] == imm.load_network(FIXTURES / "dit_imagenet_like.pkl").config["model_type"]
    assert imm.load_network(f"hf://lumaai/imm/cifar10.pt@{V1}").config == tagged.config


def test_missing_hub_file_offline_is_one_line_at_once(hub_cache, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a request was made")

    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE is set") as e:
        imm.load_network("hf://lumaai/imm/imagenet256_ts_a2.pkl")
    assert "\n" not in str(e.value) and "hf://lumaai/imm/imagenet256_ts_a2.pkl" in str(e.value)
    with pytest.raises(CheckpointError, match="hf://lumaai/imm is not in the Hugging Face cache.*hf download lumaai/imm network.safetensors"):
        imm.load_network("hf://lumaai/imm")  # its network.safetensors (an imm push repository)
    with pytest.raises(CheckpointError, match=r"hf://OWNER/REPO\[/PATH\]"):
        imm.load_network("hf://lumaai")


def test_unreachable_hub_is_one_request(hub_cache, monkeypatch):
    """Online but without a network: one request with a timeout, then one line (no download retries)."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    def unreachable(repo_id, timeout=None, **kwargs):
        calls.append((repo_id, timeout))
        raise OSError("Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, local_files_only=False, **k: (
        (_ for _ in ()).throw(huggingface_hub.errors.LocalEntryNotFoundError("not cached")) if local_files_only
        else pytest.fail("a download was tried")))
    with pytest.raises(CheckpointError, match="the Hub cannot be reached .*Name or service not known"):
        imm.load_network("hf://lumaai/imm/other.pt")
    assert calls == [("lumaai/imm", hub.REQUEST_TIMEOUT_S)]


def test_parse_hub_path():
    assert hub.parse_hub_path("hf://lumaai/imm/cifar10.pt") == ("lumaai/imm", "cifar10.pt", None)
    assert hub.parse_hub_path("hf://o/r/sub/dir/f.pkl@v1.0") == ("o/r", "sub/dir/f.pkl", "v1.0")
    assert hub.parse_hub_path("hf://o/r") == ("o/r", "network.safetensors", None)  # what imm push uploads
    assert hub.parse_hub_path("hf://o/r@v2") == ("o/r", "network.safetensors", "v2")
    for bad in ("hf://o", "hf://o//f.pt", "hf://o/r/f.pt@", "hf:///r"):
        with pytest.raises(hub.HubError):
            hub.parse_hub_path(bad)


def test_cli_info_reads_hub_paths_with_hf_home(hub_cache):
    """`imm info hf://...` in a fresh process honours HF_HOME and HF_HUB_OFFLINE."""
    env = dict(os.environ, HF_HOME=str(hub_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-m", "imm", "info", "hf://lumaai/imm/cifar10.pt"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert '"model_type": "SongUNet"' in run.stdout
    run = subprocess.run([sys.executable, "-m", "imm", "info", "hf://lumaai/imm/missing.pt"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "HF_HUB_OFFLINE is set" in run.stderr, run.stderr


def test_init_from_takes_a_hub_path(hub_cache, tmp_path):
    from imm.training.config import load_train_config
    from imm.training.loop import train, warm_start

    cfg = load_train_config("toy2d", ["training.total_steps=1", "logging.progress=false", "logging.tensorboard=false"])
    trained = train(cfg, tmp_path / "run", device="cpu")
    shutil.copy(trained, hub_cache / "hub" / "models--lumaai--imm" / "snapshots" / MAIN / "toy.safetensors")
    torch.manual_seed(1)
    net = imm.IMMNetwork(**imm.load_network(trained).config)
    warm_start("hf://lumaai/imm/toy.safetensors", net, [])
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), imm.load_network(trained).state_dict().values()))


def test_vae_hub_id_not_cached_offline_is_one_line_at_once(hub_cache, monkeypatch):
    """The SD-VAE by hub id: offline and not cached fails at once, not after huggingface_hub's retries."""
    import huggingface_hub

    from imm.data.encoders import StabilityVAEEncoder

    pytest.importorskip("diffusers")
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("a request was made offline"))
    with pytest.raises(hub.HubError, match="VAE 'stabilityai/sd-vae-ft-ema' is not in the Hugging Face cache") as e:
        StabilityVAEEncoder(vae_name="stabilityai/sd-vae-ft-ema").init("cpu")
    assert "\n" not in str(e.value) and "vae_name=/path/to/folder" in str(e.value)


def test_a_suggested_download_command_quotes_the_path_for_the_shell(hub_cache):
    import shlex

    with pytest.raises(CheckpointError) as e:
        imm.load_network("hf://lumaai/imm/x;touch pwned.pt@v1")
    command = str(e.value).split("(hf download", 1)[1].split(") and copy", 1)[0]
    assert shlex.split("hf download" + command) == ["hf", "download", "lumaai/imm", "x;touch pwned.pt", "--revision", "v1"]
