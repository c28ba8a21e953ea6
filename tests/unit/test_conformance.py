"""The released sampler's outputs on official-format checkpoints, reproduced to 1e-4 (CPU)."""

import numpy as np
import pytest
import torch

import imm
from imm.model.sampling import time_grid
from tests.helpers import FIXTURES

NETS = ["unet_cifar_like", "dit_imagenet_like"]


def _entries(manifest):
    return [(net, entry) for net in NETS for entry in manifest[net]["sampling"]]


@pytest.fixture(scope="module")
def nets():
    return {name: imm.load_network(FIXTURES / f"{name}.pkl") for name in NETS}


@pytest.mark.parametrize("net_name", NETS)
def test_config_read_from_pickle(net_name, manifest, nets):
    net = nets[net_name]
    expected = manifest[net_name]
    for key, value in expected["config"].items():
        assert net.config[key] == value, key
    assert net.img_resolution == expected["img_resolution"]
    assert net.img_channels == expected["img_channels"]
    assert net.label_dim == expected["label_dim"]
    assert not net.training and not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("net_name,entry", _entries(__import__("json").loads((FIXTURES / "manifest.json").read_text())))
def test_sampler_matches_release(net_name, entry, manifest, nets):
    data = np.load(FIXTURES / f"{net_name}.npz")
    kwargs = {k: v for k, v in manifest[net_name]["sampling"][entry].items() if k != "name"}
    labels = torch.from_numpy(data["labels"]) if data["labels"].size else None
    out = imm.sample(nets[net_name], torch.from_numpy(data["noise"]), labels, **kwargs)
    ref = torch.from_numpy(data[entry])
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-4


def test_sampler_is_sensitive_to_the_weights(manifest, nets):
    """The conformance check can fail: perturbing one weight moves the samples past the tolerance."""
    net = imm.load_network(FIXTURES / "dit_imagenet_like.pkl")
    with torch.no_grad():
        net.model.final_layer.linear.bias.add_(1e-2)
    data = np.load(FIXTURES / "dit_imagenet_like.npz")
    kwargs = {k: v for k, v in manifest["dit_imagenet_like"]["sampling"]["2_steps_nocfg"].items() if k != "name"}
    out = imm.sample(net, torch.from_numpy(data["noise"]), torch.from_numpy(data["labels"]), **kwargs)
    assert (out - torch.from_numpy(data["2_steps_nocfg"])).abs().max().item() > 1e-4


def test_time_grids(nets):
    net = nets["unet_cifar_like"]
    assert time_grid(net).tolist() == [0.994, 0.006]
    two = time_grid(net, mid_nt=[1.4])
    assert two[1].item() == pytest.approx(1.4 / 2.4, abs=1e-7)
    uni = time_grid(net, 4, "uniform")
    assert torch.allclose(uni, torch.linspace(0.994, 0.006, 5, dtype=torch.float64))
    edm = time_grid(net, 4, "edm")
    assert edm[0].item() == pytest.approx(0.994) and edm[-1].item() == pytest.approx(0.006)
    eta = net.eta(edm)
    rho = 7
    spaced = eta ** (1 / rho)
    assert torch.allclose(spaced[1:] - spaced[:-1], (spaced[1] - spaced[0]).expand(4), rtol=1e-9)
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(net, None, "uniform")
    with pytest.raises(ValueError, match="unknown discretization"):
        time_grid(net, 2, "cosine")


def test_restart_sampler(nets):
    net = nets["dit_imagenet_like"]
    x = torch.randn(3, 4, 8, 8) * 0.5
    labels = torch.tensor([0, 3, 9])
    a = imm.sample(net, x, labels, sampler="restart", num_steps=3, discretization="uniform",
                   generator=torch.Generator().manual_seed(1))
    b = imm.sample(net, x, labels, sampler="restart", num_steps=3, discretization="uniform",
                   generator=torch.Generator().manual_seed(1))
    c = imm.sample(net, x, labels, sampler="restart", num_steps=3, discretization="uniform",
                   generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # one restart step is one pushforward step T -> eps
    one_r = imm.sample(net, x, labels, sampler="restart", num_steps=1, discretization="uniform")
    one_p = imm.sample(net, x, labels, num_steps=1, discretization="uniform")
    assert torch.equal(one_r, one_p)


def test_sample_rejects_bad_input(nets):
    net = nets["unet_cifar_like"]
    with pytest.raises(ValueError, match="shape"):
        imm.sample(net, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown sampler"):
        imm.sample(net, torch.zeros(2, 3, 16, 16), sampler="heun")
    with pytest.raises(ValueError, match="cfg_scale"):
        imm.sample(net, torch.zeros(2, 3, 16, 16), cfg_scale=1.5)
    with pytest.raises(ValueError, match="class labels"):
        imm.sample(nets["dit_imagenet_like"], torch.zeros(2, 4, 8, 8), torch.tensor([0, 10]))
