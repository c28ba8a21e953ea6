"""``imm demo``: the mnist preset trained on this machine, then the FID of its EMA network at the preset's
sampling entries (1, 2 and 4 steps: what ``imm generate`` draws from it) against the bundled reference.

:func:`plan_demo` checks the arguments and the FID Inception network before training, so that a missing
network is said at the start rather than after the run (the demo then trains without FID);
:func:`run_demo` trains and measures.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from imm.core.config import ConfigError
from imm.core.fastpath import PRECISIONS

PRESET = "mnist"
REFERENCE = "mnist"  # the Inception statistics of the 5,000 bundled digits (imm/refs/)
DEFAULT_FID_IMAGES = 300  # about 1.5 min per step count on 2 CPU cores


@dataclass
class DemoPlan:
    """The training configuration and the samples per step count for the FID (0: no FID)."""

    config: dict
    fid_images: int
    no_fid_reason: str | None = None  # the first line of why the FID network could not be loaded


@dataclass
class DemoResult:
    """What a finished demo wrote, for the caller to report."""

    run_dir: Path
    network: Path  # the final EMA network
    grids: list[Path]  # the sample grids of the last step (one per sampling entry)
    fid_images: int
    fid_rows: list[dict]  # imm.evaluation.evaluate.fid_vs_steps's rows; [] without FID and on ranks other than 0

    @property
    def fid_json(self) -> Path:
        return self.run_dir / "fid" / "fid.json"


def plan_demo(overrides=(), fid_images: int = DEFAULT_FID_IMAGES) -> DemoPlan:
    """The mnist preset with ``overrides``; ``fid_images`` is 0 (no FID) or at least 2 (a covariance needs
    two samples), and becomes 0 when the FID Inception network cannot be loaded."""
    from imm.evaluation.inception import load_inception
    from imm.training.config import load_train_config

    cfg = load_train_config(PRESET, overrides)
    if fid_images < 0 or fid_images == 1:
        raise ConfigError(f"--fid-images must be 0 (no FID) or at least 2, got {fid_images}")
    if fid_images:
        try:
            load_inception()
        except (FileNotFoundError, ImportError, RuntimeError, ValueError) as e:
            return DemoPlan(cfg, 0, str(e).splitlines()[0])
    return DemoPlan(cfg, fid_images)


def run_demo(plan: DemoPlan, run_dir, device=None, allow_changes: bool = False) -> DemoResult:
    """Train (or resume) ``plan``'s run in ``run_dir``, then write ``RUN/fid/fid.json`` when it has FID images.

    The FID of a few hundred samples is biased upwards (fewer samples than the 2048 feature dimensions):
    it compares only with FIDs of as many samples, which the caller says with the numbers."""
    from imm.evaluation.evaluate import BiasedEstimateWarning, fid_vs_steps
    from imm.training.loop import train

    run_dir = Path(run_dir)
    network = train(plan.config, run_dir, device=device, allow_changes=allow_changes)
    step = plan.config["training"]["total_steps"]
    grids = sorted((run_dir / "samples").glob(f"step{step:08d}_*step.png"))
    rows = []
    if plan.fid_images:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BiasedEstimateWarning)
            training = plan.config["training"]  # sampled in the precision and layout the run trained in
            precision = training["precision"] if training["precision"] in PRECISIONS else "fp32"
            rows = fid_vs_steps(plan.config, network, REFERENCE, run_dir / "fid", num_images=plan.fid_images,
                                device=device, progress=False, precision=precision,
                                memory_format=training["memory_format"])
    return DemoResult(run_dir, network, grids, plan.fid_images, rows)
