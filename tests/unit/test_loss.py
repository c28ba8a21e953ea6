# Copyright 2025 The imm authors.
# SPDX-License-Identifier: Apache-2.0
"""Tests for the IMM training loss (imm.methods.moment_matching): Eq. 8, 12, 13, 67, App. C.4-C.9, Lemma 1 and 4."""

from __future__ import annotations

import math

import pytest
import torch

from imm.core.errors import InputError
from imm.methods import moment_matching as L
from imm.model import schedules
from imm.model.network import IMMNetwork

# ----------------------------------------------------------------------------------------------- helpers


def _randomize_(net: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Non-trivial weights everywhere (DiT's adaLN-Zero init makes the backbone output 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return net


def tiny_dit(f_type: str = "euler_fm", label_dim: int = 0, dropout: float = 0.0, eps: float = 0.0,
             schedule: str = "fm") -> IMMNetwork:
    torch.manual_seed(0)
    net = IMMNetwork(
        img_resolution=8, img_channels=4, label_dim=label_dim, model_type="DiT", patch_size=2, hidden_size=32,
        depth=1, num_heads=2, num_classes=max(label_dim, 1), dropout=dropout, f_type=f_type,
        noise_schedule=schedule, eps=eps, T=0.994,
    )
    return _randomize_(net).train()


class Recorder(torch.nn.Module):
    """Wraps a net like DDP does (``.module``) and records each call."""

    def __init__(self, net):
        super().__init__()
        self.module = net
        self.calls = []

    def forward(self, x, t, s, class_labels=None, **kwargs):
        out = self.module(x, t, s, class_labels=class_labels, **kwargs)
        self.calls.append({"grad": torch.is_grad_enabled(), "requires_grad": out.requires_grad, "kwargs": kwargs,
                               "labels": None if class_labels is None else class_labels.clone(), "x": x.clone()})
        return out


class ForcedTimes(L.IMMLoss):
    """IMMLoss with some of (t, s, r) replaced after sampling: each given as a function of the draws."""

    def __init__(self, t=None, s=None, r=None, **kwargs):
        super().__init__(**kwargs)
        self.force = {"t": t, "s": s, "r": r}

    def sample(self, net, images, labels=None, generator=None):
        d = super().sample(net, images, labels, generator)
        for key, value in self.force.items():
            if value is not None:
                d[key] = value(d)
        return d


def images(batch=8, seed=1):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.5


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def grads(net):
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


# --------------------------------------------------------------------------- boundary (Lemma 4) and zero loss


@pytest.mark.parametrize("f_type", ["simple_edm", "euler_fm"])
def test_boundary_condition_f_tt_is_identity(f_type):
    net = tiny_dit(f_type).eval()
    x = images()
    t = torch.tensor([0.0, 0.006, 0.1, 0.3, 0.5, 0.7, 0.9, 0.994])
    with torch.no_grad():
        assert torch.equal(net(x, t, t), x)  # Lemma 4: f_{t,t}(x_t) = x_t exactly
        assert not torch.allclose(net(x, t, t * 0.5), x, atol=1e-3)  # the backbone is not trivial


def test_loss_is_exactly_zero_when_r_equals_t():
    # r = t (step 0): x_r = x_t, so y_r = f_{s,t}(x_t) = y_t bit for bit and the V-statistic is exactly 0.
    net = tiny_dit("simple_edm")
    x = images()
    zero, stats = L.IMMLoss(mapping="time_decrement", mapping_step=0.0, group_size=4)(net, x, generator=gen())
    assert torch.equal(stats["r"], stats["t"])
    assert zero.item() == 0.0 and torch.all(stats["mmd2"] == 0)
    nonzero, _ = L.IMMLoss(group_size=4)(net, x, generator=gen())
    assert nonzero.item() > 0


def test_loss_is_exactly_zero_when_r_equals_s_equals_t():
    net = tiny_dit("euler_fm")
    x = images()
    loss_fn = ForcedTimes(s=lambda d: d["t"], r=lambda d: d["t"], group_size=4)
    value, stats = loss_fn(net, x, generator=gen())
    assert value.item() == 0.0 and torch.all(stats["loss"] == 0)
    value.backward()
    assert all(torch.isfinite(g).all() for g in grads(net) if g is not None)


class ConstantNet(torch.nn.Module):
    """An 'IMM network' whose output ignores its input and times: y_t == y_r always."""

    noise_schedule, sigma_data, f_type, T, eps, label_dim = "fm", 0.5, "euler_fm", 0.994, 0.0, 0

    def __init__(self):
        super().__init__()
        self.out = torch.nn.Parameter(torch.randn(4, 8, 8))

    def c_skip_c_out(self, s, t):
        from imm.model.network import c_skip_c_out
        return c_skip_c_out(s, t, self.f_type, self.noise_schedule, self.sigma_data)

    def forward(self, x, t, s, class_labels=None, force_fp32=False):
        return self.out.expand(x.shape[0], -1, -1, -1) + torch.arange(x.shape[0]).view(-1, 1, 1, 1)


def test_loss_is_exactly_zero_for_identical_outputs():
    value, stats = L.IMMLoss()(ConstantNet(), images(), generator=gen())
    assert value.item() == 0.0 and torch.all(stats["mmd2"] == 0)


# ------------------------------------------------------------------------------------- Lemma 1 (M = 1)


def test_group_mmd_energy_m1_is_squared_error():
    ga, gb = torch.randn(5, 1, 3, 4, 4, dtype=torch.float64), torch.randn(5, 1, 3, 4, 4, dtype=torch.float64)
    w = torch.rand(5, dtype=torch.float64)
    out = L.group_mmd(ga, gb, w, "energy")
    ref = w * (ga - gb).flatten(1).square().sum(1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)


def test_imm_m1_energy_kernel_is_consistency_model_loss():
    """Lemma 1: M = 1 and k = -||x - y||^2 / 2 give w(t) ||f_{s,t}(x_t) - f_{s,r}(x_r)||^2 per sample."""
    net = tiny_dit("simple_edm")
    x = images()
    loss_fn = L.IMMLoss(group_size=1, kernel="energy")
    value, stats = loss_fn(net, x, generator=gen(3))
    d = loss_fn.sample(net, x, generator=gen(3))  # the same draws
    x_t = schedules.add_noise(x, d["t"].view(-1, 1, 1, 1), d["noise"], "fm")
    x_r = schedules.add_noise(x, d["r"].view(-1, 1, 1, 1), d["noise"], "fm")
    with torch.no_grad():
        y_t, y_r = net(x_t, d["t"], d["s"]), net(x_r, d["r"], d["s"])
    cm = L.weighting(d["t"], "fm") * (y_t - y_r).flatten(1).square().sum(1)
    torch.testing.assert_close(stats["loss"], cm, rtol=1e-5, atol=0)
    torch.testing.assert_close(value.detach(), cm.mean(), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------- kernels


def test_kernels_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    ya, yb = (torch.randn(3, 4, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    kw = torch.tensor([0.5, 2.0, 30.0], dtype=torch.float64)
    D = 32
    a, b = ya.flatten(2), yb.flatten(2)

    def dist(u, v):  # brute-force pairwise distances [G, M, M]
        return torch.tensor([[[(u[i, j] - v[i, k]).norm().item() for k in range(4)] for j in range(4)] for i in range(3)],
                            dtype=torch.float64)

    for kernel, k in {
        "laplace": lambda d: torch.exp(-kw.view(-1, 1, 1) * d.clamp(min=1e-8) / D),
        "rbf": lambda d: torch.exp(-(kw.view(-1, 1, 1) * d) ** 2 / D),
        "energy": lambda d: -0.5 * d**2,
        "pseudo_huber": lambda d: 0.5 * (0.00054 * math.sqrt(D) - torch.sqrt(d**2 + 0.00054**2 * D)),
    }.items():
        ref = k(dist(a, a)).mean((1, 2)) + k(dist(b, b)).mean((1, 2)) - 2 * k(dist(a, b)).mean((1, 2))
        out = L.group_mmd(ya, yb, None, kernel, kw)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-14, msg=kernel)
        if kernel != "energy":  # characteristic / conditionally positive-definite kernels: MMD^2 >= 0
            assert torch.all(out > 0), kernel


def test_kernel_weight_is_inverse_c_out():
    s, t = torch.tensor([0.1, 0.0, 0.5]), torch.tensor([0.3, 0.9, 0.994])
    torch.testing.assert_close(L.kernel_weight(s, t, "euler_fm", "fm", 0.5), 1 / ((t - s) * 0.5))
    a_t, s_t, a_s, s_s = 1 - t, t, 1 - s, s
    ref = torch.sqrt(a_t**2 + s_t**2) / (0.5 * (a_s * s_t - a_t * s_s).abs())
    torch.testing.assert_close(L.kernel_weight(s, t, "simple_edm", "fm", 0.5), ref)
    assert torch.isfinite(L.kernel_weight(t, t, "euler_fm")).all()  # s = t: capped, not inf


def test_laplace_gradients_are_finite_at_zero_distance():
    y = torch.randn(2, 4, 16, requires_grad=True)
    out = L.group_mmd(y, y.detach().clone(), torch.ones(2), "laplace", torch.tensor([1.0, 1e20]))
    out.sum().backward()
    assert torch.isfinite(y.grad).all()


# ------------------------------------------------------------------------------------- weighting, Eq. 13


def test_weighting_matches_reference_values():
    t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.9, 0.994], dtype=torch.float64)
    w = L.weighting(t, "fm", a=1, b=4)
    for value, printed, digits in zip(w.tolist(), [0.57, 4.9, 5.2, 3.9, 1.355, 1.02], [2, 1, 1, 1, 3, 2]):
        assert round(value, digits) == printed
    w2 = L.weighting(torch.tensor([0.9, 0.99], dtype=torch.float64), "fm", a=2, b=4)
    assert round(w2[0].item(), 2) == 0.14 and round(w2[1].item(), 2) == 0.01
    assert L.weighting(torch.tensor([0.5]), "fm").dtype == torch.float32


# ---------------------------------------------------------------------------------------- mapping r(s,t)


def test_eta_decrement_gaps_match_reference():
    t = torch.tensor([0.05, 0.5, 0.9, 0.994], dtype=torch.float64)
    gap = t - L.map_r(torch.zeros_like(t), t, "fm", T=0.994, eps=0.0, k=12)
    # the expected gaps to the digits given: 0.037, 0.010, 4e-4, 1.4e-6 (each within one unit of its last digit)
    for value, printed, unit in zip(gap.tolist(), [0.037, 0.010, 4e-4, 1.4e-6], [1e-3, 1e-3, 1e-4, 1e-7]):
        assert abs(value - printed) <= unit, (value, printed)
    # closed form for OT-FM: eta_r = eta_t - eta(T) / 2^12
    eta_r = t / (1 - t) - (0.994 / 0.006) / 4096
    torch.testing.assert_close(t - gap, eta_r / (1 + eta_r), rtol=1e-12, atol=1e-15)
    gap15 = 0.994 - L.map_r(torch.zeros(1, dtype=torch.float64), torch.tensor([0.994], dtype=torch.float64), k=15)
    assert abs(gap15.item() - 1.8e-7) <= 1e-8


def test_min_gap_and_ordering():
    g = torch.Generator().manual_seed(0)
    t, s = L.sample_times(20000, 0.994, 0.0, generator=g, dtype=torch.float64)
    r = L.map_r(s, t, k=12)
    assert torch.all(s <= r) and torch.all(r <= t) and torch.any(r == s) and torch.any(r > s)
    r_gap = L.map_r(s, t, k=12, min_gap=1e-4)
    assert torch.all(r_gap >= s) and torch.all(r_gap <= r)
    big = t - s > 1e-4
    assert torch.all(r_gap[big] <= t[big] - 1e-4 + 1e-12)
    assert torch.any(r_gap < r)  # near t = 1 the eta gap is below 1e-4 and min_gap takes over
    t1 = torch.tensor([0.994], dtype=torch.float64)
    assert 0.994 - L.map_r(torch.zeros_like(t1), t1, min_gap=1e-4).item() == pytest.approx(1e-4)


@pytest.mark.parametrize("mapping", L.MAPPINGS)
@pytest.mark.parametrize("schedule", ["fm", "vp_cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_mapping_stays_between_s_and_t(mapping, schedule, dtype):
    T, eps = (0.994, 0.006) if schedule == "fm" else (0.996, 0.006)
    t, s = L.sample_times(5000, T, eps, schedule, generator=gen(1), dtype=dtype)
    r = L.map_r(s, t, schedule, T, eps, k=12, mapping=mapping)
    assert r.dtype == dtype
    assert torch.all(s <= r) and torch.all(r <= t) and torch.all(r >= eps - 1e-7)
    assert torch.any(r < t) and torch.any(r > s)
    r0 = L.map_r(s, t, schedule, T, eps, mapping=mapping, step=0.0)  # step 0: r = t (up to the eta round trip)
    assert torch.equal(r0, t) if mapping == "time_decrement" else torch.allclose(r0, t, rtol=1e-6, atol=0)


def test_mapping_default_steps():
    assert L.mapping_step("time_decrement", "fm", 0.994, 0.0, 12) == 2.0**-12
    assert L.mapping_step("eta_decrement", "fm", 0.994, 0.0, 12) == pytest.approx(0.994 / 0.006 / 4096)
    lam = lambda t: 2 * (math.log(1 - t) - math.log(t))
    assert L.mapping_step("logsnr_decrement", "fm", 0.994, 0.0, 12) == pytest.approx((lam(0.001) - lam(0.994)) / 4096)
    assert L.mapping_step("inverse_eta_increment", "fm", 0.994, 0.0, 12) == pytest.approx((0.995 / 0.005) / 4096)


@pytest.mark.parametrize("mode", L.TIME_SAMPLINGS)
def test_sample_times_range(mode):
    t, s = L.sample_times(20000, 0.994, 0.006, "fm", mode, generator=gen(2))
    assert torch.all(0.006 <= s) and torch.all(s <= t) and torch.all(t <= 0.994)
    if mode == "uniform":
        assert abs(t.mean().item() - 0.5) < 0.01
        assert abs((s - 0.006).mean().item() - (t - 0.006).mean().item() / 2) < 0.01
    elif mode == "lognormal":  # eta_t ~ LogNormal(-1.1, 2) truncated: median eta_t ~ exp(-1.1) = 0.33 -> t ~ 0.25
        nt = t / (1 - t)
        assert abs(nt.log().median().item() + 1.1) < 0.15


# ------------------------------------------------------------------------------------- the two passes


def test_gradient_flows_only_through_the_online_pass():
    net = tiny_dit("simple_edm")
    rec = Recorder(net)
    x = images()
    loss_fn = L.IMMLoss(group_size=4)
    value, _ = loss_fn(rec, x, generator=gen(5))
    value.backward()
    g_loss = grads(net)
    # one pass with grad on the online net, one no-grad fp32 pass on the target (same weights)
    assert [(c["grad"], c["requires_grad"]) for c in rec.calls] == [(False, False), (True, True)]
    assert rec.calls[0]["kwargs"] == {"force_fp32": True} and rec.calls[1]["kwargs"] == {}

    d = loss_fn.sample(net, x, generator=gen(5))
    t, s, r = (d[k].repeat_interleave(4) for k in ("t", "s", "r"))
    x_t = schedules.add_noise(x, t.view(-1, 1, 1, 1), d["noise"], "fm")
    x_r = schedules.add_noise(x, r.view(-1, 1, 1, 1), d["noise"], "fm")
    assert torch.equal(rec.calls[1]["x"], x_t) and torch.equal(rec.calls[0]["x"], x_r)
    # x_r = DDIM(x_t, x, r, t) (Eq. 11) with the same x and eps
    torch.testing.assert_close(x_r, schedules.ddim(x_t, x, t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1), "fm"))

    def manual(detach):
        net.zero_grad()
        y_t, y_r = net(x_t, t, s), net(x_r, r, s)
        y_r = y_r.detach() if detach else y_r
        kw = L.kernel_weight(d["s"], d["t"], "simple_edm", "fm", 0.5)
        per_group = L.group_mmd(y_t.view(2, 4, -1), y_r.view(2, 4, -1), L.weighting(d["t"], "fm"), "laplace", kw)
        per_group.mean().backward()
        return grads(net)

    for got, want in zip(g_loss, manual(detach=True)):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    assert any(a is not None and not torch.allclose(a, b, rtol=1e-3, atol=1e-8)
               for a, b in zip(g_loss, manual(detach=False)))


def test_target_net_runs_the_no_grad_pass():
    net = tiny_dit("euler_fm")
    online, target = Recorder(net), Recorder(net)
    L.IMMLoss(target_fp32=False)(online, images(), target_net=target, generator=gen())
    assert [c["grad"] for c in online.calls] == [True] and [c["grad"] for c in target.calls] == [False]
    assert target.calls[0]["kwargs"] == {"force_fp32": False}


def test_shared_dropout_mask():
    net = tiny_dit("simple_edm", dropout=0.5)  # train mode; r = t makes both passes see the same input
    x = images()
    shared, _ = L.IMMLoss(mapping="time_decrement", mapping_step=0.0, share_dropout=True)(net, x, generator=gen())
    assert shared.item() == 0.0
    independent, _ = L.IMMLoss(mapping="time_decrement", mapping_step=0.0, share_dropout=False)(net, x, generator=gen())
    assert independent.item() > 0
    # the global RNG still advances (the online pass draws after the rewind)
    before = torch.get_rng_state()
    L.IMMLoss()(net, x, generator=gen())
    assert not torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("same", [True, False])
def test_label_dropout(same):
    net = tiny_dit("euler_fm", label_dim=10)
    rec = Recorder(net)
    x = images(16)
    ids = torch.arange(16) % 10
    onehot = torch.nn.functional.one_hot(ids, 10).float()
    _, stats = L.IMMLoss(label_dropout=0.5, same_dropped_labels=same)(rec, x, ids, generator=gen(7))
    target, online = rec.calls[0]["labels"], rec.calls[1]["labels"]
    dropped = online.sum(1) == 0
    assert 0 < dropped.sum() < 16  # independent per label
    assert torch.equal(online[~dropped], onehot[~dropped])
    assert stats["label_dropped"].item() == pytest.approx(dropped.float().mean().item())
    assert torch.equal(target, online if same else onehot)

    rec.calls.clear()  # p = 0 keeps every label; one-hot float labels are accepted as given
    L.IMMLoss()(rec, x, onehot, generator=gen(7))
    assert torch.equal(rec.calls[0]["labels"], onehot) and torch.equal(rec.calls[1]["labels"], onehot)
    rec.calls.clear()  # p = 1 drops every label to the null (all-zero) row
    L.IMMLoss(label_dropout=1.0)(rec, x, ids, generator=gen(7))
    assert torch.all(rec.calls[1]["labels"] == 0)


@pytest.mark.parametrize("bad", [10, -1])
def test_out_of_range_class_label_is_refused_in_one_line(bad):
    net = tiny_dit("euler_fm", label_dim=10)
    ids = torch.tensor([0, 1, bad, 3])
    with pytest.raises(InputError, match=r"class labels must lie in \[0, 10\); got ") as e:
        L.IMMLoss()(net, images(4), ids, generator=gen(0))
    assert len(str(e.value).splitlines()) == 1 and f"{min(bad, 0)}..{max(bad, 3)}" in str(e.value)


# --------------------------------------------------------------------------------- reduction and checks


def test_nonfinite_groups_are_excluded_and_counted():
    net = tiny_dit("euler_fm", eps=0.0)
    x = images(12)

    def t_with_zero(d):  # w(t = 0) = 0 * inf = NaN (Eq. 13) in group 0
        t = d["t"].clone()
        t[0] = 0.0
        return t

    loss_fn = ForcedTimes(t=t_with_zero, s=lambda d: torch.minimum(d["s"], d["t"]),
                          r=lambda d: torch.minimum(d["r"], d["t"]), group_size=4)
    value, stats = loss_fn(net, x, generator=gen())
    assert torch.isnan(stats["loss"][0]) and torch.isfinite(stats["loss"][1:]).all()
    assert stats["nonfinite"].item() == 1 and isinstance(stats["nonfinite"], torch.Tensor)
    torch.testing.assert_close(value.detach(), stats["loss"][1:].mean())
    value.backward()
    assert all(torch.isfinite(g).all() for g in grads(net) if g is not None)

    per_group = torch.tensor([1.0, float("inf"), 3.0, float("nan")], requires_grad=True)
    mean, count = L.finite_mean(per_group)
    mean.backward()
    assert mean.item() == 2.0 and count.item() == 2 and torch.equal(per_group.grad, torch.tensor([0.5, 0, 0.5, 0]))
    assert L.finite_mean(torch.full((3,), float("nan")))[0].item() == 0.0


def test_stats_and_batch_checks():
    net = tiny_dit("euler_fm")
    value, stats = L.IMMLoss(group_size=4)(net, images(8), generator=gen())
    assert value.ndim == 0 and value.requires_grad
    for key in ("loss", "mmd2", "t", "s", "r", "weight", "kernel_weight", "k_tt", "k_rr", "k_tr"):
        assert stats[key].shape == (2,) and not stats[key].requires_grad, key
    assert torch.all(stats["s"] <= stats["r"]) and torch.all(stats["r"] <= stats["t"])
    with pytest.raises(ValueError, match="divisible by group_size"):
        L.IMMLoss(group_size=4)(net, images(6))
    for bad in ({"kernel": "gauss"}, {"mapping": "x"}, {"time_sampling": "beta"}, {"group_size": 0}):
        with pytest.raises(ValueError):
            L.IMMLoss(**bad)


def test_loss_is_deterministic_given_generator():
    net = tiny_dit("simple_edm")
    a, sa = L.IMMLoss()(net, images(), generator=gen(4))
    b, sb = L.IMMLoss()(net, images(), generator=gen(4))
    assert torch.equal(a, b) and torch.equal(sa["t"], sb["t"])
