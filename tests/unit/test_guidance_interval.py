"""Guidance interval (Kynkaanniemi et al. 2024): classifier-free guidance only on the steps whose
start time lies in ``cfg_interval``."""

import pytest
import torch

import imm
from imm.core.config import ConfigError
from imm.evaluation.sampling_run import sampling_entries
from tests.helpers import FIXTURES

DIT = FIXTURES / "dit_imagenet_like.pkl"  # class-conditional, 4x8x8 latents


@pytest.fixture(scope="module")
def net():
    return imm.load_network(DIT).eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 2])


def test_interval_covering_all_times_is_plain_cfg(net):
    x, labels = _inputs()
    for sampler in ("pushforward", "restart"):
        kw = dict(sampler=sampler, num_steps=3, discretization="uniform", cfg_scale=1.5,
                  generator=torch.Generator().manual_seed(0))
        plain = imm.sample(net, x, labels, **kw)
        kw["generator"] = torch.Generator().manual_seed(0)
        assert torch.equal(imm.sample(net, x, labels, cfg_interval=[0.0, 1.0], **kw), plain)


def test_empty_interval_is_no_guidance(net):
    x, labels = _inputs()
    kw = dict(num_steps=2, discretization="uniform")
    unguided = imm.sample(net, x, labels, **kw)
    guided = imm.sample(net, x, labels, cfg_scale=1.5, **kw)
    assert not torch.allclose(guided, unguided)  # guidance does change the output here
    # the steps start at T = 0.994 and 0.5: none lies in [0, 0.1]
    assert torch.equal(imm.sample(net, x, labels, cfg_scale=1.5, cfg_interval=[0.0, 0.1], **kw), unguided)


def test_interval_guides_only_its_steps_in_one_call_each(net):
    """Two uniform steps start at T and at 0.5; [0.6, 1] guides the first only: it equals a guided first
    step followed by an unguided second one, and every step is one network call (batch 2B when guided)."""
    x, labels = _inputs()
    t = imm.model.sampling.time_grid(net, 2, "uniform")
    one_hot = net.one_hot(labels, 2, x.device)
    with torch.no_grad():
        x1 = net(x.double(), t[0], t[1], one_hot, cfg_scale=1.5).double()
        expected = net(x1, t[1], t[2], one_hot).float()
    batches = []
    hook = net.model.register_forward_hook(lambda mod, args, output: batches.append(args[0].shape[0]))
    try:
        out = imm.sample(net, x, labels, num_steps=2, discretization="uniform", cfg_scale=1.5, cfg_interval=[0.6, 1.0])
    finally:
        hook.remove()
    assert torch.equal(out, expected)
    assert batches == [4, 2]


def test_interval_errors_and_config_entries(net):
    x, labels = _inputs()
    with pytest.raises(ValueError, match="needs cfg_scale"):
        imm.sample(net, x, labels, num_steps=2, discretization="uniform", cfg_interval=[0.0, 1.0])
    with pytest.raises(ValueError, match="t_lo <= t_hi"):
        imm.sample(net, x, labels, num_steps=2, discretization="uniform", cfg_scale=1.5, cfg_interval=[0.8, 0.2])
    entries = sampling_entries({"sampling": {"2_steps": {"num_steps": 2, "discretization": "uniform",
                                                         "cfg_scale": 1.5, "cfg_interval": [0.6, 1.0]}}})
    assert entries["2_steps"].cfg_interval == (0.6, 1.0)
    assert entries["2_steps"].kwargs()["cfg_interval"] == [0.6, 1.0]
    with pytest.raises(ConfigError, match=r"unknown config key 'sampling\.a\.cfg_intervall'; did you mean "
                                          r"'sampling\.a\.cfg_interval'"):
        sampling_entries({"sampling": {"a": {"cfg_intervall": [0, 1]}}})


def test_fid_rows_count_the_guided_steps_only(net):
    from imm.evaluation.evaluate import steps_and_nfe
    from imm.model.sampling import SamplingEntry

    entry = {"num_steps": 2, "discretization": "uniform", "cfg_scale": 1.5}
    assert steps_and_nfe(net, SamplingEntry(**entry)) == (2, 4)
    assert steps_and_nfe(net, SamplingEntry(**{**entry, "cfg_interval": [0.6, 1.0]})) == (2, 3)
    assert steps_and_nfe(net, SamplingEntry(**{**entry, "cfg_scale": None})) == (2, 2)
