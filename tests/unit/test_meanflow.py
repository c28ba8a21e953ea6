"""MeanFlow (loss.kind=meanflow): the target against a hand derivation, the JVP against finite differences on
every backbone, the sampler as MeanFlow's step, the compute counted, the combinations it refuses."""

import pytest
import torch

import imm
from imm.core.config import ConfigError
from imm.core.errors import InputError
from imm.methods import registry as methods
from imm.methods.cost import forward_equivalents
from imm.methods.meanflow import MeanFlowLoss, average_velocity, velocity_and_total_derivative
from imm.model.network import IMMNetwork
from imm.training.config import load_train_config

NETS = {
    "unet": dict(img_resolution=8, img_channels=3, label_dim=3, model_type="SongUNet", model_channels=8,
                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0),
    "dit": dict(img_resolution=8, img_channels=4, label_dim=3, model_type="DiT", patch_size=2, hidden_size=32,
                depth=2, num_heads=2, dropout=0.0),
    "mlp": dict(img_resolution=1, img_channels=2, label_dim=3, model_type="MLP", hidden=32, depth=2),
}


def tiny(name: str, dtype=torch.float32) -> IMMNetwork:
    """A tiny euler_fm network with (t, t - r) conditioning and weights moved off their initialisation (the
    zero-initialised output layers would make u = 0)."""
    torch.manual_seed(0)
    net = IMMNetwork(**NETS[name], f_type="euler_fm", temb_type="stride").to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


class ClosedForm(torch.nn.Module):
    """A stand-in network whose average velocity is known: u(z, r, t) = t^2 z + sin(r) + 3 t, i.e. the backbone
    output G = u / sigma_d (what IMMNetwork(..., backbone_only=True) returns)."""

    sigma_data, f_type, eps, T, label_dim = 0.5, "euler_fm", 0.0, 1.0, 0

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # u carries a gradient through it

    def c_skip_c_out(self, s, t):  # what imm.methods.moment_matching._unwrap looks for
        raise NotImplementedError

    def one_hot(self, labels, batch, device):
        return None

    def forward(self, z, t, r, class_labels=None, backbone_only=False):
        assert backbone_only
        t4, r4 = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
        return self.scale * (t4**2 * z + torch.sin(r4) + 3 * t4) / self.sigma_data


def test_target_is_the_meanflow_identity_by_hand():
    """u_tgt = v - (t - r)(v . d_z u + d_t u) with d_z u = t^2 I and d_t u = 2 t z + 3, the loss the adaptive
    weighted squared error against it, and the gradient flows through u only."""
    net = ClosedForm()
    loss_fn = MeanFlowLoss(r_neq_t_fraction=1.0, p=0.5, c=1e-2)
    x = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    loss, stats = loss_fn(net, x, generator=torch.Generator().manual_seed(1))
    # the same draws by hand
    gen = torch.Generator().manual_seed(1)
    t, r = (v.float() for v in loss_fn.sample_times(6, 0.0, 1.0, gen))
    noise = torch.randn(x.shape, generator=gen) * 0.5
    assert torch.equal(stats["t"], t) and torch.equal(stats["r"], r) and bool((t > r).all())
    t4, r4 = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z, v = (1 - t4) * x + t4 * noise, noise - x
    u = t4**2 * z + torch.sin(r4) + 3 * t4
    target = v - (t4 - r4) * (t4**2 * v + 2 * t4 * z + 3)
    squared = (u - target).square().flatten(1).sum(1)
    weight = (squared + 1e-2) ** -0.5
    assert torch.allclose(stats["loss"], weight * squared, rtol=1e-5)
    assert loss.item() == pytest.approx((weight * squared).mean().item(), rel=1e-5)
    loss.backward()  # d loss / d scale = mean w * 2 (u - target) . u, target held fixed
    expected = (weight * 2 * ((u - target) * u).flatten(1).sum(1)).mean()
    assert net.scale.grad.item() == pytest.approx(expected.item(), rel=1e-4)


def test_r_equals_t_gives_flow_matching_and_the_fraction_holds():
    loss_fn = MeanFlowLoss(r_neq_t_fraction=0.25)
    t, r = loss_fn.sample_times(20000, 0.006, 0.994, torch.Generator().manual_seed(0))
    assert bool((t >= r).all()) and float(t.min()) > 0.006 and float(t.max()) < 0.994
    assert (t != r).double().mean().item() == pytest.approx(0.25, abs=0.01)
    # where r = t the target is v itself: the loss is plain flow matching on u
    net = ClosedForm()
    x = torch.randn(4, 1, 2, 2)
    _, stats = MeanFlowLoss(r_neq_t_fraction=0.0, p=0.0)(net, x, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    t, _ = (v.float() for v in MeanFlowLoss(r_neq_t_fraction=0.0).sample_times(4, 0.0, 1.0, gen))
    noise = torch.randn(x.shape, generator=gen) * 0.5
    t4 = t.view(-1, 1, 1, 1)
    z = (1 - t4) * x + t4 * noise
    u = t4**2 * z + torch.sin(t4) + 3 * t4
    assert torch.allclose(stats["loss"], (u - (noise - x)).square().flatten(1).sum(1), rtol=1e-5)


@pytest.mark.parametrize("name", list(NETS))
def test_jvp_matches_central_differences(name):
    """d/dt u_theta along (v, 0, 1) from the JVP equals (u(z + h v, r, t + h) - u(z - h v, r, t - h)) / 2h, in
    float64 on each backbone (attention included), with the (t, t - r) conditioning."""
    net = tiny(name, torch.float64)
    shape = (4, net.img_channels, net.img_resolution, net.img_resolution)
    gen = torch.Generator().manual_seed(0)
    z, v = torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.7, 0.95], dtype=torch.float64)
    r = t * torch.tensor([0.0, 0.5, 1.0, 0.3], dtype=torch.float64)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).double()
    u, dudt = velocity_and_total_derivative(net, z, t, r, v, labels)
    assert u.requires_grad and not dudt.requires_grad
    h = 1e-6
    with torch.no_grad():
        ahead = average_velocity(net, z + h * v, t + h, r, labels)
        behind = average_velocity(net, z - h * v, t - h, r, labels)
    fd = (ahead - behind) / (2 * h)
    assert torch.allclose(u, average_velocity(net, z, t, r, labels))
    assert float((dudt - fd).abs().max()) < 1e-5 * float(fd.abs().max()), name


@pytest.mark.parametrize("name", list(NETS))
def test_compute_per_sample_is_what_the_flop_counter_counts(name):
    """The registry's forward-pass equivalents of every method agree with torch.utils.flop_counter on each
    backbone (within what the first layer's input gradient, which no method needs, leaves out)."""
    net = tiny(name).train()
    x = torch.randn(8, net.img_channels, net.img_resolution, net.img_resolution)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for method, spec in methods.METHODS.items():
        measured = forward_equivalents(methods.build_loss({"kind": method}), net, x, labels)
        assert spec.forward_equivalents - 0.5 < measured <= spec.forward_equivalents + 0.35, (method, measured)
    # guidance in training adds one no-grad pass per term
    base = forward_equivalents(MeanFlowLoss(), net, x, labels)
    assert forward_equivalents(MeanFlowLoss(omega=2.0), net, x, labels) == pytest.approx(base + 1, abs=1e-6)
    assert forward_equivalents(MeanFlowLoss(omega=1.5, kappa=0.5), net, x, labels) == pytest.approx(base + 2, abs=1e-6)


def test_guidance_in_training_mixes_the_velocity_where_labels_are_kept():
    net = tiny("mlp")
    z = torch.randn(4, 2, 1, 1)
    v = torch.randn(4, 2, 1, 1)
    t = torch.tensor([0.3, 0.5, 0.7, 0.9])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    keep = torch.tensor([True, True, False, True])
    loss_fn = MeanFlowLoss(omega=2.0, kappa=0.5)
    got = loss_fn.guided_velocity(net, z, t, v, labels, keep)
    u_null = average_velocity(net, z, t, t, torch.zeros_like(labels))
    u_cond = average_velocity(net, z, t, t, labels)
    want = 2.0 * v + 0.5 * u_cond + (1 - 2.0 - 0.5) * u_null
    assert torch.allclose(got[keep], want[keep], atol=1e-6) and torch.equal(got[~keep], v[~keep])
    with pytest.raises(InputError, match="class-conditional"):
        loss_fn.guided_velocity(net, z, t, v, None, None)


def test_the_sampler_is_the_meanflow_step():
    """A MeanFlow network samples through its registry entry: one step z_0 = z_T - (T - eps) u(z_T, eps, T), two
    steps through the grid's middle time."""
    net = tiny("mlp").eval()
    x_T = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    sample = methods.entry_sampler("meanflow")
    with torch.no_grad():
        one = sample(net, x_T, None, num_steps=1, discretization="uniform")
        by_hand = x_T - (net.T - net.eps) * average_velocity(net, x_T, torch.tensor(net.T), torch.tensor(net.eps))
        assert torch.allclose(one, by_hand, atol=1e-5)
        mid = (net.T + net.eps) / 2
        z_mid = x_T - (net.T - mid) * average_velocity(net, x_T, torch.tensor(net.T), torch.tensor(mid))
        two = z_mid - (mid - net.eps) * average_velocity(net, z_mid, torch.tensor(mid), torch.tensor(net.eps))
        assert torch.allclose(sample(net, x_T, None, num_steps=2, discretization="uniform"), two, atol=1e-5)
    with pytest.raises(ConfigError, match="cannot honour sampler=restart"):
        sample(net, x_T, None, num_steps=2, discretization="uniform", sampler="restart")


def test_combinations_it_cannot_train_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="needs network.f_type=euler_fm .got simple_edm."):
        load_train_config("mnist", ["loss.kind=meanflow"])
    with pytest.raises(ConfigError, match="needs network.s_embed=true .got false.: u depends on r"):
        load_train_config("mnist", ["loss.kind=meanflow", "network.f_type=euler_fm", "network.s_embed=false"])
    with pytest.raises(ConfigError, match="cannot train with training.parallel=fsdp: its forward-mode JVP"):
        load_train_config("toy2d", ["loss.kind=meanflow", "training.parallel=fsdp"])
    with pytest.raises(ConfigError, match="cannot train with training.compile=true: torch.compile runs"):
        load_train_config("toy2d", ["loss.kind=meanflow", "training.compile=true"])
    with pytest.raises(ConfigError, match="cannot train with training.memory_format=channels_last: PyTorch's"):
        load_train_config("toy2d", ["loss.kind=meanflow", "training.memory_format=channels_last"])
    with pytest.raises(ConfigError, match="loss.k applies to loss.kind=imm, not meanflow"):
        load_train_config("toy2d", ["loss.kind=meanflow", "loss.k=3"])
    cfg = load_train_config("toy2d", ["loss.kind=meanflow", "loss.r_neq_t_fraction=0.5", "loss.p=0.5"])
    assert cfg["loss"]["r_neq_t_fraction"] == 0.5 and cfg["loss"]["p"] == 0.5
    for bad in ({"r_neq_t_fraction": 1.5}, {"p": -1}, {"c": 0}, {"P_std_t": 0}, {"label_dropout": 2}):
        with pytest.raises(InputError):
            MeanFlowLoss(**bad)
    with pytest.raises(InputError, match="needs network.f_type=euler_fm"):  # a network built around the config
        net = imm.IMMNetwork(**{**NETS["mlp"], "f_type": "simple_edm"})
        MeanFlowLoss()(net, torch.randn(4, 2, 1, 1))


def test_groupnorm_forward_mode_fails_channels_last_so_auto_never_chooses_it(monkeypatch):
    """The refusal above stands on a PyTorch limit, checked here so that a torch that lifts it is noticed; and
    ``training.memory_format=auto`` gives MeanFlow the contiguous layout whatever the probe measured."""
    from imm.core import fastpath
    from imm.training.config import TrainingSection, fast_path

    norm, x = torch.nn.GroupNorm(2, 4), torch.randn(2, 4, 3, 3)
    torch.func.jvp(norm, (x,), (torch.ones_like(x),))  # contiguous: fine
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        channels_last = x.contiguous(memory_format=torch.channels_last)
        torch.func.jvp(norm, (channels_last,), (torch.ones_like(channels_last),))
    asked = []
    monkeypatch.setattr(fastpath, "choose", lambda family, device, precision, layout: asked.append(layout))
    for method in ("imm", "meanflow"):
        fast_path(TrainingSection(memory_format="auto"), {}, torch.device("cpu"), method)
    assert asked == ["auto", "contiguous"]
