"""The machine's fast path: the probe and its choice (imm.core.fastpath), the bf16 working copy
(imm.model.precision), and training and sampling with them."""

import json
import math

import pytest
import torch

from imm.core import fastpath
from imm.methods.registry import build_loss
from imm.model.network import IMMNetwork
from imm.model.precision import copy_weights, sampling_network, working_copy
from imm.training.checkpoints import TrainingError, load_latest_state
from imm.training.config import load_train_config
from imm.training.loop import train
from tests.helpers import image_cfg, npz_images

CONV = ("fp32/contiguous", "fp32/channels_last", "bf16/contiguous", "bf16/channels_last")


def timings(conv=(1.0, 1.0, 1.0, 1.0), matmul=(1.0, 1.0)):
    return {"conv": dict(zip(CONV, conv)), "matmul": dict(zip(("fp32/contiguous", "bf16/contiguous"), matmul))}


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache of this test's own (the suite's holds timings that make auto fp32 contiguous)."""
    monkeypatch.setenv("IMM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_choice_follows_the_margins():
    even = fastpath.choose_from(timings(), "conv")
    assert (even.precision, even.memory_format) == ("fp32", "contiguous")
    assert "1.00x as fast in bf16" in even.reason and "under the 1.2x" in even.reason
    # bf16 1.19x faster: not enough; 1.25x: bf16. The layout is chosen within the chosen precision.
    assert fastpath.choose_from(timings(conv=(1.19, 2, 1, 2)), "conv").precision == "fp32"
    fast = fastpath.choose_from(timings(conv=(1.25, 2, 1.0, 0.8)), "conv")
    assert (fast.precision, fast.memory_format) == ("bf16", "channels_last")
    assert fastpath.choose_from(timings(conv=(1.25, 2, 1.0, 0.95)), "conv").memory_format == "contiguous"
    assert fastpath.choose_from(timings(conv=(1.0, 0.8, 2, 2)), "conv").memory_format == "channels_last"
    # the matmul family has no layout to choose; an explicit setting is kept
    assert fastpath.choose_from(timings(matmul=(2.0, 1.0)), "matmul") == fastpath.FastPath(
        "bf16", "contiguous", "a matmul block ran 2.00x as fast in bf16 as in fp32")
    kept = fastpath.choose_from(timings(conv=(2, 2, 1, 1)), "conv", precision="fp32", memory_format="contiguous")
    assert (kept.precision, kept.memory_format) == ("fp32", "contiguous")
    # an fp16 run chooses its layout by the bf16 timings, a tf32 one by fp32's
    assert fastpath.choose_from(timings(conv=(1, 2, 1, 0.5)), "conv", precision="fp16").memory_format == "channels_last"
    assert fastpath.choose_from(timings(conv=(1, 2, 1, 0.5)), "conv", precision="tf32").memory_format == "contiguous"


def test_probe_runs_once_per_machine_and_torch_version(own_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(fastpath, "measure", lambda: calls.append(1) or timings(conv=(2, 2, 1, 1)))
    path = fastpath.choose("conv", "cpu")
    assert path.precision == "bf16" and path.reason.startswith(f"auto on {fastpath.cpu_name()}: a conv block ran 2.00x")
    assert fastpath.choose("matmul", "cpu").precision == "fp32"
    assert fastpath.choose("matmul", "cpu", "bf16") == fastpath.FastPath("bf16", "contiguous")  # no layout to choose
    assert len(calls) == 1
    cached = json.loads(fastpath.cache_path().read_text())
    assert cached["torch"] == torch.__version__ and cached["cpu"] == fastpath.cpu_name()
    monkeypatch.setattr(torch, "__version__", "0.0.0")  # another torch: another cache entry, probed again
    fastpath.choose("conv", "cpu")
    assert len(calls) == 2 and len(list(own_cache.iterdir())) == 2
    fastpath.cache_path().write_text("{not json")  # a damaged cache is measured again
    fastpath.choose("conv", "cpu")
    assert len(calls) == 3
    # nothing auto: no probe; on CUDA auto is TF32, contiguous, without a probe
    assert fastpath.choose("conv", "cpu", "fp32", "contiguous") == fastpath.FastPath("fp32", "contiguous")
    assert (fastpath.choose("conv", "cuda").precision, len(calls)) == ("tf32", 3)
    with pytest.raises(fastpath.InputError, match="unknown network family"):
        fastpath.choose("rnn", "cpu")


def test_measure_times_every_variant():
    measured = fastpath.measure(rounds=1)
    assert set(measured) == {"conv", "matmul"} and set(measured["conv"]) == set(CONV)
    assert all(0 < t < math.inf for family in measured.values() for t in family.values())


def _randomized(net):
    """``net`` with every parameter redrawn (a fresh UNet's zero-initialised output layers hide the backbone)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


NETWORKS = {
    "SongUNet": dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=16, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[4], dropout=0.0, embedding_type="fourier",
                     encoder_type="residual", resample_filter=[1, 3, 3, 1], f_type="simple_edm"),
    "DiT": dict(img_resolution=8, img_channels=4, label_dim=4, f_type="simple_edm", depth=2, hidden_size=64,
                num_heads=2, patch_size=2),
    "MLP": dict(img_resolution=1, img_channels=2, label_dim=0),
}


@pytest.mark.parametrize("model_type", NETWORKS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_working_copy_computes_in_bf16_and_returns_fp32(model_type, memory_format):
    net = _randomized(IMMNetwork(model_type=model_type, **NETWORKS[model_type])).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copy = working_copy(net, torch.bfloat16, memory_format)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the original is untouched
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert all(b.dtype == before[k].dtype for k, b in copy.named_buffers())  # time frequencies, filters
    assert copy.compute_dtype() == torch.bfloat16 and net.compute_dtype() == torch.float32
    if memory_format == torch.channels_last:
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in copy.parameters() if p.ndim == 4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, net.img_channels, net.img_resolution, net.img_resolution, generator=gen)
    y = torch.randint(0, net.label_dim, (6,), generator=gen) if net.label_dim else None
    t, s = torch.full((6,), 0.8), torch.full((6,), 0.3)

    def backbone_error(model):  # G, not f = c_skip x + c_out G, where c_skip x would hide it
        with torch.no_grad():
            want = net(x, t, s, y, backbone_only=True)
            return float((model(x, t, s, y, backbone_only=True) - want).abs().max() / want.abs().max())

    with torch.no_grad():
        assert copy(x, t, s, y).dtype == copy(x, t, s, y, backbone_only=True).dtype == torch.float32
    # bf16 keeps 8 significant bits: G is not bit-equal, but off by at most twice what autocast in bf16 gives
    # (measured: 1.2-1.6x autocast's 0.6-1.6% of G's scale), the copy also computing the norms in bf16
    autocast = IMMNetwork(model_type=model_type, mixed_precision="bf16", **NETWORKS[model_type]).eval()
    autocast.load_state_dict(net.state_dict())
    bound = 2 * backbone_error(autocast)
    assert 0 < backbone_error(copy) <= bound < 0.04
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(-1)
    assert backbone_error(copy) > 0.5
    copy_weights(copy, net)  # a refresh: the copy follows the fp32 weights again
    assert backbone_error(copy) <= bound


def test_sampling_network_copies_only_when_it_must():
    net = IMMNetwork(model_type="MLP", **NETWORKS["MLP"])
    assert sampling_network(net) is net
    copy = sampling_network(net, torch.bfloat16)
    assert copy is not net and not copy.training and not any(p.requires_grad for p in copy.parameters())


def test_loss_in_bf16_is_within_what_bf16_allows():
    """The IMM loss's kernels and reductions run in fp32 on the working copy's fp32 outputs: the loss of a bf16
    pass is the fp32 loss to bf16's resolution (measured: about 1e-2 relative here), and its gradient points
    the same way."""
    net = _randomized(IMMNetwork(model_type="SongUNet", **NETWORKS["SongUNet"]))
    copy = working_copy(net, torch.bfloat16)
    loss_fn = build_loss({"kind": "imm", "group_size": 4, "k": 3, "a": 1, "b": 5})
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.5
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(3))
    results = []
    for model in (net, copy):
        loss, _ = loss_fn(model, x, y, generator=torch.Generator().manual_seed(4))
        loss.backward()
        grad = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])
        results.append((loss.detach(), grad))
    (loss32, grad32), (loss16, grad16) = results
    assert loss16.dtype == torch.float32
    assert abs(float(loss16 / loss32) - 1) < 0.03
    assert float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)) > 0.98


def test_bf16_training_keeps_fp32_weights_and_resumes_bit_exact(tmp_path, capsys):
    npz = npz_images(tmp_path / "d.npz")
    fast = ["training.precision=bf16", "training.memory_format=channels_last", "logging.sample_every=2",
            "logging.sample_steps=[1]", "logging.sample_count=4"]
    train(image_cfg(npz, "training.total_steps=4", *fast), tmp_path / "full", device="cpu")
    assert capsys.readouterr().out.startswith("imm train: computing in bf16, channels_last (as configured)")
    train(image_cfg(npz, "training.total_steps=2", *fast), tmp_path / "part", device="cpu")
    train(image_cfg(npz, "training.total_steps=4", *fast), tmp_path / "part", device="cpu")
    _, full = load_latest_state(tmp_path / "full")
    _, part = load_latest_state(tmp_path / "part")
    assert full["step"] == 4 and all(torch.equal(full["model"][k], part["model"][k]) for k in full["model"])
    assert all(v.dtype == torch.float32 for v in full["model"].values() if v.is_floating_point())
    assert "mixed_precision" not in full["network_config"] or full["network_config"]["mixed_precision"] is None
    assert (tmp_path / "full" / "samples" / "step00000002_1step.png").exists()
    # the same 4 steps in fp32 land near the bf16 run (bf16 gradients, fp32 updates), not on it
    train(image_cfg(npz, "training.total_steps=4", "training.precision=fp32"), tmp_path / "fp32", device="cpu")
    _, fp32 = load_latest_state(tmp_path / "fp32")
    moved = [k for k in fp32["model"] if fp32["model"][k].is_floating_point()
             and not torch.equal(fp32["model"][k], full["model"][k])]
    assert moved
    for k in moved:
        torch.testing.assert_close(full["model"][k], fp32["model"][k], rtol=0.05, atol=0.01)


def test_auto_follows_the_probe_and_says_why(tmp_path, own_cache, capsys):
    fastpath.record(timings(conv=(2.0, 2.0, 1.0, 1.5)))  # this "machine": bf16 pays, channels_last does not
    npz = npz_images(tmp_path / "d.npz")
    train(image_cfg(npz, "training.total_steps=1", "training.precision=auto"), tmp_path / "run", device="cpu")
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"imm train: computing in bf16, contiguous (NCHW) (auto on {fastpath.cpu_name()}: a conv "
                     "block ran 2.00x as fast in bf16 as in fp32; channels_last 0.67x as fast as contiguous in bf16)")


def test_presets_for_cpus_choose_their_precision():
    """mnist trains in the machine's fast path; toy2d stays fp32 (bf16 hurt its 1-step samples); GPU presets keep
    theirs."""
    cpu = {"mnist"}
    for preset in ("mnist", "toy2d", "cifar10", "imagenet256-dit-s", "imagenet256-dit-xl"):
        training = load_train_config(preset, ["dataset.path=x"])["training"]
        assert (training["precision"] == "auto") == (preset in cpu), preset
        assert training["memory_format"] == "auto"


def test_a_failing_torch_compile_is_one_error_line(tmp_path, monkeypatch):
    """torch.compile's failures surface at the first step (torch 2.13's CPU inductor fails on the bf16 UNet step:
    docs/benchmarks.md); the run stops with one line naming the setting to change."""

    class Broken(torch.nn.Module):  # what torch.compile returns, failing at its first call
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, *args, **kwargs):
            raise torch._dynamo.exc.BackendCompilerFailed(
                lambda: None, RuntimeError("C++ compile error\nerror: conflicting declaration"), None)

    monkeypatch.setattr(torch, "compile", Broken)
    npz = npz_images(tmp_path / "d.npz")
    with pytest.raises(TrainingError, match=r"torch.compile failed on this network in fp32 on cpu \(.*conflicting "
                                            r"declaration\); train with training.compile=false"):
        train(image_cfg(npz, "training.total_steps=1", "training.compile=true"), tmp_path / "run", device="cpu")


def test_channels_last_runs_keep_the_network_and_its_emas_in_that_layout(tmp_path):
    from dataclasses import replace

    from imm.data.datasets import build_dataset
    from imm.data.encoders import build_encoder
    from imm.training.config import network_config, sections
    from imm.training.loop import set_up_state

    cfg = image_cfg(npz_images(tmp_path / "d.npz"), "training.phema=true")
    opt, training, _ = sections(cfg)
    training = replace(training, precision="bf16", memory_format="channels_last")
    net_cfg = network_config(cfg, build_dataset(cfg["dataset"]), build_encoder(cfg["encoder"]))
    state, model, _ = set_up_state(cfg, training, opt, net_cfg, tmp_path / "run", "cpu", False, False)
    assert model is state.working
    for module in (state.net, state.working, *state.ema_networks):
        convs = [p for p in module.parameters() if p.ndim == 4 and p.shape[-1] > 1]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                             for p in convs)
    assert all(p.dtype == torch.float32 for m in (state.net, *state.ema_networks) for p in m.parameters())
