"""The baselines (imm.methods.flow_matching, imm.methods.consistency): flow matching and consistency training on IMM's networks and trainer,
and the toy-data metrics."""

import math

import pytest
import torch

import imm
from imm.core.config import ConfigError
from imm.data.datasets import toy2d_sample
from imm.evaluation.toy_metrics import mmd, mmd_self_term
from imm.methods import registry as methods
from imm.methods.consistency import ConsistencyTrainingLoss, ict_num_levels, karras_levels
from imm.methods.flow_matching import FlowMatchingLoss, flow_sample
from imm.training.config import load_train_config
from imm.training.loop import train
from tests.helpers import TOY_QUIET


def mlp_net(**kw):
    torch.manual_seed(0)
    cfg = dict(img_resolution=1, img_channels=2, model_type="MLP", hidden=32, depth=1, f_type="euler_fm",
               temb_type="stride", sigma_data=1.0, T=0.994, eps=0.0)
    return imm.IMMNetwork(**{**cfg, **kw})


class PointMassVelocity(torch.nn.Module):
    """The exact flow of the OT path to the point mass x0: v(x_t, t) = (x_t - x0) / t; G = v / sigma_d."""

    def __init__(self, x0, sigma_data=0.5, T=1.0, eps=0.0):
        super().__init__()
        self.x0, self.sigma_data, self.T, self.eps, self.label_dim = x0, sigma_data, T, eps, 0
        self.noise_schedule, self.f_type = "fm", "euler_fm"
        self.c_skip_c_out = None

    def forward(self, x, t, s, class_labels=None, cfg_scale=None, backbone_only=False):
        assert backbone_only and torch.equal(torch.as_tensor(t), torch.as_tensor(s))  # FM feeds s = t
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - self.x0) / t / self.sigma_data


def test_flow_matching_loss_is_zero_for_the_exact_velocity_only():
    x0 = torch.randn(1, 3, 4, 4)
    images = x0.expand(16, -1, -1, -1)
    net = PointMassVelocity(x0, T=0.994, eps=0.01)
    loss, stats = FlowMatchingLoss()(net, images, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-9 and stats["loss"].shape == (16,) and int(stats["nonfinite"]) == 0
    wrong = PointMassVelocity(x0 + 0.1, T=0.994, eps=0.01)
    assert FlowMatchingLoss()(wrong, images, generator=torch.Generator().manual_seed(0))[0].item() > 1e-3


@pytest.mark.parametrize("solver,nfe", [("euler", 1), ("euler", 4), ("heun", 2), ("heun", 8)])
def test_flow_sampler_integrates_the_exact_flow_to_the_data(solver, nfe):
    """The point-mass paths are straight lines x_t = (1 - t) x0 + t z: Euler and Heun follow them exactly
    from x_T = z at T = 1 to eps (the velocity is singular at t = 0 itself)."""
    x0 = torch.randn(1, 3, 4, 4)
    net = PointMassVelocity(x0, T=1.0, eps=0.01)
    z = torch.randn(5, 3, 4, 4) * 0.5
    x = flow_sample(net, z, nfe=nfe, solver=solver)
    assert torch.allclose(x, 0.99 * x0 + 0.01 * z, atol=1e-5)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_flow_sampler_follows_a_given_time_grid(solver):
    """Any decreasing grid from T to eps follows the straight point-mass paths exactly, and a uniform
    grid given explicitly is the default grid's computation."""
    x0 = torch.randn(1, 3, 4, 4)
    net = PointMassVelocity(x0, T=1.0, eps=0.01)
    z = torch.randn(5, 3, 4, 4) * 0.5
    x = flow_sample(net, z, solver=solver, grid=torch.tensor([1.0, 0.75, 0.2, 0.01]))
    assert torch.allclose(x, 0.99 * x0 + 0.01 * z, atol=1e-5)
    uniform = torch.linspace(1.0, 0.01, 3, dtype=torch.float64)
    assert torch.equal(flow_sample(net, z, solver=solver, grid=uniform),
                       flow_sample(net, z, nfe=2 if solver == "euler" else 4, solver=solver))


def test_flow_sampler_rejects_bad_nfe():
    net = PointMassVelocity(torch.zeros(1, 2, 1, 1))
    with pytest.raises(ValueError, match="even"):
        flow_sample(net, torch.zeros(1, 2, 1, 1), nfe=3, solver="heun")
    with pytest.raises(ValueError, match="solver"):
        flow_sample(net, torch.zeros(1, 2, 1, 1), nfe=2, solver="rk4")
    with pytest.raises(ValueError, match="decreasing"):
        flow_sample(net, torch.zeros(1, 2, 1, 1), grid=torch.tensor([0.5, 0.7, 0.01]))
    with pytest.raises(ValueError, match="disagrees"):
        flow_sample(net, torch.zeros(1, 2, 1, 1), nfe=4, grid=torch.tensor([1.0, 0.5, 0.01]))


def test_ict_curriculum_and_levels():
    # iCT: K = 400k steps, s0 = 10, s1 = 1280 -> K' = 50k; N doubles every 50k steps up to 1281
    assert [ict_num_levels(k, 400_000) for k in (0, 49_999, 50_000, 100_000, 350_000, 399_999)] == \
        [11, 11, 21, 41, 1281, 1281]
    eta = karras_levels(11, 0.002, 80.0)
    assert eta[0].item() == pytest.approx(0.002) and eta[-1].item() == pytest.approx(80.0)
    assert torch.all(eta[1:] > eta[:-1])


def test_consistency_loss_is_ict_pseudo_huber_with_s_at_eps():
    """loss = mean lambda_i (sqrt(||f(x_t) - f(x_r)||^2 + c^2) - c) with s = eps, adjacent Karras levels."""
    net = mlp_net(eps=0.0).train()
    ct = ConsistencyTrainingLoss()
    ct.set_progress(0, 1000)
    images = toy2d_sample("gaussians8", 32, torch.Generator().manual_seed(0)).reshape(32, 2, 1, 1)
    loss, stats = ct(net, images, generator=torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    t, r, lam = ct.sample_times(net, 32, g)
    eta = ct.levels(net)
    assert len(eta) == 11 and torch.all(r < t)
    assert torch.allclose(1 / lam, schedules_eta(t) - schedules_eta(r))  # adjacent levels on the grid
    assert all(any(torch.isclose(schedules_eta(v), eta).tolist()) for v in t)
    noise = torch.randn(images.shape, generator=g) * net.sigma_data
    x_t = (1 - t).view(-1, 1, 1, 1) * images + t.view(-1, 1, 1, 1) * noise
    x_r = (1 - r).view(-1, 1, 1, 1) * images + r.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        d2 = (net(x_t, t, torch.zeros_like(t)) - net(x_r, r, torch.zeros_like(r))).flatten(1).square().sum(1)
    c = 0.00054 * math.sqrt(2)
    expected = (lam * ((d2 + c * c).sqrt() - c)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(stats["s"], torch.zeros(32)) and int(stats["num_levels"]) == 11
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def schedules_eta(t):
    return t.double() / (1 - t.double())


def test_build_loss_and_bad_methods():
    assert isinstance(methods.build_loss({"kind": "flow_matching"}), FlowMatchingLoss)
    assert isinstance(methods.build_loss({"group_size": 2}), imm.methods.moment_matching.IMMLoss)
    with pytest.raises(ValueError, match="unknown loss.kind 'gan'"):
        methods.build_loss({"kind": "gan"})
    with pytest.raises(ValueError, match="did you mean 'consistency'"):
        methods.build_loss({"kind": "consistancy"})
    with pytest.raises(ValueError, match="kernel"):
        ConsistencyTrainingLoss(kernel="laplace")
    with pytest.raises(ConfigError, match="unknown loss.kind 'gan'"):  # the release's key lands on loss.kind
        load_train_config("toy2d", ["loss.method=gan"])
    with pytest.raises(ConfigError, match="loss.eta_min"):  # a consistency-only key with flow matching
        load_train_config("toy2d", ["loss.method=flow_matching", "+loss.eta_min=0.1"])
    # a preset's IMM keys do not stop a baseline; its shared keys and the method's defaults are used
    cfg = load_train_config("imagenet256-dit-s", ["loss.method=consistency", "dataset.path=x"])
    assert cfg["loss"]["label_dropout"] == 0.1 and cfg["loss"]["kernel"] == "pseudo_huber"
    assert "group_size" not in cfg["loss"]


def test_mmd_matches_brute_force_and_separates():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 2, generator=g), torch.randn(70, 2, generator=g) + 0.3

    def k(a, b):
        d2 = torch.cdist(a.double(), b.double()).square()
        return sum(torch.exp(-d2 / (2 * h * h)) for h in (0.1, 0.3, 1.0))

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    brute = ((kxx.sum() - kxx.trace()) / (50 * 49) + (kyy.sum() - kyy.trace()) / (70 * 69) - 2 * kxy.mean()).item()
    assert mmd(x, y) == pytest.approx(brute, rel=1e-4)
    assert mmd(x, y, y_self_term=mmd_self_term(y)) == pytest.approx(brute, rel=1e-4)
    same = [mmd(torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g)) for _ in range(5)]
    shifted = mmd(torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g) + 0.5)
    assert abs(sum(same) / 5) < 0.01 < shifted


@pytest.mark.parametrize("method", ["flow_matching", "consistency", "meanflow"])
def test_generate_and_eval_sample_a_baseline_checkpoint_with_its_own_sampler(method, tmp_path, monkeypatch):
    """A checkpoint records its loss.kind, and `imm generate` / the FID path sample it with that method's
    sampler."""
    from imm import cli
    from imm.io.checkpoint import read_sampling_settings

    path = train(load_train_config("toy2d", [*TOY_QUIET, f"loss.method={method}", "training.total_steps=2",
                                              "training.batch_size=64"]), tmp_path / "run", device="cpu")
    assert read_sampling_settings(path)["loss"] == {"kind": method}
    calls = []
    real = methods.METHODS[method]
    recording = methods.Method(real.loss, lambda *a, num_steps, **kw: calls.append(num_steps)
                               or real.sample(*a, num_steps=num_steps, **kw),
                               real.forward_equivalents, real.samplers, real.solvers)
    monkeypatch.setitem(methods.METHODS, method, recording)
    assert cli.main(["generate", "--checkpoint", str(path), "--out", str(tmp_path / "gen")]) == 0
    assert calls == [1, 2, 4]  # the toy2d preset's 1_step, 2_steps and 4_steps entries
    # imm eval fid samples through the same entry sampler: an entry's step count, the method's sampler
    net = imm.load_network(path)
    sampler = methods.entry_sampler(method)
    calls.clear()
    x = sampler(net, torch.randn(8, 2, 1, 1), None, generator=torch.Generator().manual_seed(0), num_steps=2,
                discretization="uniform")
    assert calls == [2] and x.shape == (8, 2, 1, 1)
