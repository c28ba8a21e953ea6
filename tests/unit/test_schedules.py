"""Schedules, the DDIM interpolant and the f_{s,t} parametrizations (paper Sec. 2, App. C)."""

import math

import pytest
import torch

from imm.model import schedules
from imm.model.network import IMMNetwork, c_skip_c_out

T64 = torch.linspace(0.01, 0.99, 41, dtype=torch.float64)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_eta_inverse_and_logsnr(name):
    eta = schedules.eta(T64, name)
    alpha, sigma = schedules.alpha_sigma(T64, name)
    assert torch.allclose(eta, sigma / alpha, rtol=1e-12)
    assert torch.allclose(schedules.eta_to_t(eta, name), T64, atol=1e-12)
    assert torch.allclose(schedules.logsnr(T64, name), 2 * torch.log(alpha / sigma), rtol=1e-10)
    # d lambda / dt against a central difference
    h = 1e-6
    numeric = (schedules.logsnr(T64 + h, name) - schedules.logsnr(T64 - h, name)) / (2 * h)
    assert torch.allclose(schedules.dlogsnr_dt(T64, name), numeric, rtol=1e-6)
    # float32 in, float32 out (computed in float64 inside)
    assert schedules.logsnr(T64.float(), name).dtype == torch.float32


def test_fm_values():
    t = torch.tensor([0.25], dtype=torch.float64)
    assert schedules.eta(t, "fm").item() == pytest.approx(1 / 3)
    assert schedules.eta_to_t(torch.tensor([1.4], dtype=torch.float64), "fm").item() == pytest.approx(1.4 / 2.4)
    assert schedules.eta_to_t(torch.tensor([math.inf], dtype=torch.float64), "fm").item() == 1.0
    cos = schedules.eta_to_t(torch.tensor([1.0], dtype=torch.float64), "vp_cosine").item()
    assert cos == pytest.approx(0.5)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_ddim_self_consistent_and_marginal(name):
    """DDIM(DDIM(x_t, x, t, r), x, r, s) = DDIM(x_t, x, t, s) (App. C.1); x_t = DDIM(eps, x, t, 1)."""
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    t, r, s = [torch.tensor(v, dtype=torch.float64) for v in (0.8, 0.5, 0.2)]
    x_t = schedules.add_noise(x, t, eps, name)
    two = schedules.ddim(schedules.ddim(x_t, x, t, r, name), x, r, s, name)
    assert torch.allclose(two, schedules.ddim(x_t, x, t, s, name), atol=1e-12)
    assert torch.allclose(schedules.ddim(x_t, x, t, s, name), schedules.add_noise(x, s, eps, name), atol=1e-12)
    if name == "fm":
        one = torch.tensor(1.0, dtype=torch.float64)
        assert torch.allclose(schedules.ddim(eps, x, one, t, name), x_t, atol=1e-12)


class _Const(torch.nn.Module):
    """A backbone that returns a fixed random output: isolates the parametrization."""

    def __init__(self, **kwargs):
        super().__init__()
        self.out = torch.nn.Parameter(torch.randn(1, 3, 4, 4))

    def forward(self, x, t, s, class_labels=None):
        return self.out.expand(x.shape[0], -1, -1, -1)


@pytest.fixture
def const_backbone(monkeypatch):
    import imm.model.network

    monkeypatch.setattr(imm.model.network, "build_backbone", lambda model_type, **kw: _Const(**kw))


@pytest.mark.parametrize("f_type,schedule", [("simple_edm", "fm"), ("simple_edm", "vp_cosine"), ("euler_fm", "fm")])
def test_boundary_condition(const_backbone, f_type, schedule):
    """f_{t,t}(x) = x exactly for simple_edm and euler_fm (Lemma 4), and f is not the identity otherwise."""
    net = IMMNetwork(4, 3, f_type=f_type, noise_schedule=schedule, model_type="Const")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        tt = torch.tensor(t, dtype=torch.float64)
        assert torch.equal(net(x, tt, tt), x)
        assert not torch.allclose(net(x, tt, tt - 0.05), x)


def test_parametrization_formulas():
    s, t = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    a_t, s_t, a_s, s_s = 0.3, 0.7, 0.7, 0.3
    c_skip, c_out = c_skip_c_out(s, t, "simple_edm", "fm", 0.5)
    assert c_skip.item() == pytest.approx((a_t * a_s + s_t * s_s) / (a_t**2 + s_t**2))
    assert c_out.item() == pytest.approx(-(a_s * s_t - a_t * s_s) * 0.5 / math.sqrt(a_t**2 + s_t**2))
    c_skip, c_out = c_skip_c_out(s, t, "euler_fm", "fm", 0.5)
    assert c_skip.item() == 1 and c_out.item() == pytest.approx(-0.4 * 0.5)
    c_skip, c_out = c_skip_c_out(s, t, "identity", "fm", 0.5)
    assert c_skip.item() == pytest.approx(s_s / s_t) and c_out.item() == pytest.approx(a_s - s_s / s_t * a_t)
    # simple_edm under the cosine schedule: cos(pi (t-s)/2) x - sin(pi (t-s)/2) sigma_d G  (App. C.5)
    c_skip, c_out = c_skip_c_out(s, t, "simple_edm", "vp_cosine", 0.5)
    assert c_skip.item() == pytest.approx(math.cos(math.pi * 0.4 / 2))
    assert c_out.item() == pytest.approx(-math.sin(math.pi * 0.4 / 2) * 0.5)


def test_wrapper_rejects_bad_options():
    with pytest.raises(ValueError, match="f_type"):
        IMMNetwork(8, 4, f_type="nope", model_type="DiT")
    with pytest.raises(ValueError, match="euler_fm"):
        IMMNetwork(8, 4, f_type="euler_fm", noise_schedule="vp_cosine", model_type="DiT")
    with pytest.raises(ValueError, match="mixed_precision"):
        IMMNetwork(8, 4, mixed_precision="fp8", model_type="DiT")
    with pytest.raises(ValueError, match="model_type"):
        IMMNetwork(8, 4, model_type="ResNet")


def test_cfg_formula_and_mixed_precision():
    """CFG combines backbone outputs before c_skip/c_out; bf16 autocast runs on CPU."""
    torch.manual_seed(0)
    net = IMMNetwork(8, 4, label_dim=10, model_type="DiT", patch_size=2, hidden_size=32, depth=1,
                     num_heads=2, num_classes=10, f_type="euler_fm").eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 4, 8, 8)
    t, s = torch.tensor(0.8), torch.tensor(0.3)
    labels = torch.tensor([1, 7])
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    g_c = net.backbone(x, t, s, onehot)
    g_u = net.backbone(x, t, s, torch.zeros_like(onehot))
    w = 1.5
    expected = x - (t - s) * 0.5 * (g_u + w * (g_c - g_u))
    assert torch.allclose(net(x, t, s, labels, cfg_scale=w), expected, atol=1e-5)
    assert not torch.allclose(net(x, t, s, labels), expected, atol=1e-3)
    net.mixed_precision = "bf16"
    out = net(x, t, s, labels)
    assert out.dtype == torch.float32 and torch.allclose(out, net(x, t, s, labels, force_fp32=True), atol=5e-2)
