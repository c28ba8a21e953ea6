"""A sampling entry means the same thing for every method: each method's entry sampler
(imm.methods.registry.entry_sampler) samples the entry's time grid, and refuses in one line a key it cannot
honour."""

import pytest
import torch

import imm
from imm import cli
from imm.core.config import ConfigError
from imm.evaluation.evaluate import steps_and_nfe
from imm.evaluation.generate import draw, seeded_inputs
from imm.evaluation.sampling_run import resolve_sampling_run, sampling_config
from imm.methods import registry as methods
from imm.methods.flow_matching import flow_sample
from imm.model import schedules
from imm.model.sampling import SamplingEntry, time_grid
from imm.training.config import load_train_config
from imm.training.loop import train
from tests.helpers import TOY_QUIET

MID = SamplingEntry(mid_nt=(3.0,))  # T -> t = 3 / (1 + 3) = 0.75 -> eps on the OT path (the mnist preset's 2_steps)


def tiny_net(f_type: str) -> imm.IMMNetwork:
    """A random class-conditional MLP on 2-D points (the OT path's times, eps > 0)."""
    torch.manual_seed(0)
    return imm.IMMNetwork(img_resolution=1, img_channels=2, label_dim=3, model_type="MLP", hidden=16, depth=1,
                          noise_schedule="fm", f_type=f_type, temb_type="stride", sigma_data=1.0, T=0.994,
                          eps=0.006).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 2, 1, 1, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])


def sample_entry(method, net, x, labels, entry, seed=2):
    return methods.entry_sampler(method)(net, x, labels, generator=torch.Generator().manual_seed(seed),
                                         **entry.kwargs())


@pytest.mark.parametrize("solver", [None, "euler", "heun"])
def test_flow_matching_integrates_along_the_entrys_grid(solver):
    net, (x, labels) = tiny_net("euler_fm"), inputs()
    mid = SamplingEntry(mid_nt=MID.mid_nt, solver=solver)
    explicit = flow_sample(net, x, labels, solver=solver or "euler",
                           grid=torch.tensor([net.T, 0.75, net.eps], dtype=torch.float64))
    assert torch.equal(sample_entry("flow_matching", net, x, labels, mid), explicit)
    uniform = SamplingEntry(num_steps=2, discretization="uniform", solver=solver)
    assert not torch.allclose(sample_entry("flow_matching", net, x, labels, uniform), explicit)
    edm = SamplingEntry(num_steps=3, discretization="edm", solver=solver)
    assert torch.equal(sample_entry("flow_matching", net, x, labels, edm),
                       flow_sample(net, x, labels, solver=solver or "euler", grid=time_grid(net, 3, "edm")))
    assert not torch.allclose(sample_entry("flow_matching", net, x, labels, edm),
                              sample_entry("flow_matching", net, x, labels, SamplingEntry.uniform(3)))


def test_consistency_restarts_at_the_entrys_times():
    """Denoise to eps from T, re-noise to t = 0.75 with fresh noise from the generator, denoise to eps: the
    multistep consistency sampler on the grid [T, 0.75, eps], for an entry's pushforward and restart alike."""
    net, (x, labels) = tiny_net("simple_edm"), inputs()
    one_hot, g = net.one_hot(labels, len(x), x.device), torch.Generator().manual_seed(2)
    t, eps = torch.tensor([net.T, 0.75], dtype=torch.float64), torch.tensor(net.eps, dtype=torch.float64)
    with torch.no_grad():
        y = net(x.double(), t[0], eps, one_hot).double()
        noise = torch.randn(y.shape, generator=g, dtype=torch.float64) * net.sigma_data
        expected = net(schedules.add_noise(y, t[1], noise, "fm"), t[1], eps, one_hot).float()
    for sampler in ("pushforward", "restart"):
        got = sample_entry("consistency", net, x, labels, SamplingEntry(sampler=sampler, mid_nt=MID.mid_nt))
        assert torch.equal(got, expected), sampler
    assert not torch.allclose(sample_entry("consistency", net, x, labels, SamplingEntry.uniform(2)), expected)


def test_imm_samples_every_entry_exactly_as_imm_sample():
    net, (x, labels) = tiny_net("euler_fm"), inputs()
    entries = [MID, SamplingEntry.uniform(2), SamplingEntry(sampler="restart", num_steps=3, discretization="edm"),
               SamplingEntry(num_steps=2, discretization="uniform", cfg_scale=1.5, cfg_interval=(0.6, 1.0))]
    for entry in entries:
        expected = imm.sample(net, x, labels, generator=torch.Generator().manual_seed(2), **entry.kwargs())
        assert torch.equal(sample_entry("imm", net, x, labels, entry), expected), entry


def test_flow_matching_guidance_follows_the_interval():
    """cfg_scale guides the velocity; cfg_interval only the steps starting inside it (imm.sample's rule)."""
    net, (x, labels) = tiny_net("euler_fm"), inputs()
    for solver, per_step in (("euler", 1), ("heun", 2)):
        plain = SamplingEntry(num_steps=2, discretization="uniform", solver=solver)  # steps start at T and 0.5
        guided = plain.with_guidance(cfg_scale=2.0)
        unguided_x, guided_x = (sample_entry("flow_matching", net, x, labels, e) for e in (plain, guided))
        assert not torch.allclose(guided_x, unguided_x)
        assert torch.equal(guided_x, flow_sample(net, x, labels, solver=solver, cfg_scale=2.0, nfe=2 * per_step))
        everywhere = guided.with_guidance(cfg_interval=[0.0, 1.0])
        nowhere = guided.with_guidance(cfg_interval=[0.0, 0.1])
        first = guided.with_guidance(cfg_interval=[0.6, 1.0])
        assert torch.equal(sample_entry("flow_matching", net, x, labels, everywhere), guided_x)
        assert torch.equal(sample_entry("flow_matching", net, x, labels, nowhere), unguided_x)
        first_x = sample_entry("flow_matching", net, x, labels, first)
        assert not torch.allclose(first_x, guided_x) and not torch.allclose(first_x, unguided_x)
        assert steps_and_nfe(net, first) == (2, per_step * 3)  # the guided first step is a doubled batch


@pytest.mark.parametrize("method,entry,key", [
    ("flow_matching", SamplingEntry(sampler="restart", num_steps=2, discretization="uniform"), "sampler=restart"),
    ("flow_matching", SamplingEntry(num_steps=2, discretization="uniform", solver="rk4"), "solver=rk4"),
    ("consistency", SamplingEntry(num_steps=2, discretization="uniform", solver="heun"), "solver=heun"),
    ("imm", SamplingEntry(num_steps=2, discretization="uniform", solver="euler"), "solver=euler"),
])
def test_a_key_the_method_cannot_honour_is_refused_in_one_line(method, entry, key):
    net, (x, labels) = tiny_net("euler_fm"), inputs()
    with pytest.raises(ConfigError, match=f"loss.kind={method} cannot honour {key}") as e:
        sample_entry(method, net, x, labels, entry)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=f"sampling entry 'two': loss.kind={method} cannot honour {key}"):
        methods.check_entries(method, {"one": MID, "two": entry})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A flow-matching and a consistency run of the toy2d preset, 2 steps each."""
    out = tmp_path_factory.mktemp("entries")
    return {method: train(load_train_config("toy2d", [*TOY_QUIET, f"loss.method={method}", "training.total_steps=2",
                                                      "training.batch_size=64"]), out / method, device="cpu")
            for method in ("flow_matching", "consistency")}


MID_OVERRIDES = ["sampling.2_steps.num_steps=null", "sampling.2_steps.discretization=null",
                 "+sampling.2_steps.mid_nt=[3.0]"]


def test_a_checkpoints_recorded_entry_is_sampled_on_its_grid(checkpoints):
    """imm generate's and imm eval fid's path (the resolved run, image i from seed eval.seed + i): the toy2d
    entry 2_steps moved to t = 0.75 is Euler along [T, 0.75, eps] for flow matching, not the uniform grid."""
    path, indices = checkpoints["flow_matching"], list(range(5))
    runs = {}
    for name, overrides in (("mid", MID_OVERRIDES), ("uniform", [])):
        cfg, source = sampling_config(None, path, overrides)
        runs[name] = resolve_sampling_run(cfg, path, torch.device("cpu"), source=source, names=["2_steps"])
    run = runs["mid"]
    assert run.method == "flow_matching" and run.entries["2_steps"] == MID
    noise, _ = seeded_inputs(run.net, indices, run.eval.seed)
    grid = torch.tensor([run.net.T, 0.75, run.net.eps], dtype=torch.float64)
    expected = run.encoder.decode(flow_sample(run.net, noise, grid=grid))
    assert torch.equal(draw(run, run.entries["2_steps"], indices), expected)
    uniform = runs["uniform"]
    assert not torch.allclose(draw(uniform, uniform.entries["2_steps"], indices), expected)


@pytest.mark.parametrize("method,override,key", [("consistency", "+sampling.2_steps.solver=heun", "solver=heun"),
                                                 ("flow_matching", "+sampling.2_steps.solver=rk4", "solver=rk4")])
def test_imm_generate_refuses_a_key_the_checkpoints_method_cannot_honour(checkpoints, method, override, key,
                                                                         tmp_path, capsys):
    out = tmp_path / "gen"
    assert cli.main(["generate", "--checkpoint", str(checkpoints[method]), "--out", str(out), override]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"sampling entry '2_steps': loss.kind={method} cannot honour {key}" in err
    assert not out.exists()


def test_a_preset_config_samples_a_checkpoint_with_the_method_it_records(checkpoints):
    """`--config toy2d` names no method: the method the checkpoint records (flow matching) samples it, from the
    final network file and from a training state alike."""
    path = checkpoints["flow_matching"]
    cfg, source = sampling_config("toy2d", path, [])
    assert "kind" not in (cfg.get("loss") or {})
    run = resolve_sampling_run(cfg, path, torch.device("cpu"), source=source, names=["2_steps"])
    assert run.method == "flow_matching"
    state = path.parent / "checkpoints" / "training-state-00000002.pt"
    assert resolve_sampling_run(cfg, state, torch.device("cpu"), source=source).method == "flow_matching"
    recorded = resolve_sampling_run(*sampling_config(None, path, [])[:1], path, torch.device("cpu"), names=["2_steps"])
    indices = list(range(4))
    assert torch.equal(draw(run, run.entries["2_steps"], indices), draw(recorded, recorded.entries["2_steps"], indices))
