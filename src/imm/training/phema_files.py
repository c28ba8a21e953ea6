"""Post-hoc EMA on disk: the snapshots a run with ``training.phema=true`` writes
(``RUN/phema/phema-STEP-SIGMA_REL.safetensors``, ordinary network files) and ``imm ema reconstruct``,
which combines them into the EMA of any other width (the math is in :mod:`imm.training.phema`)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from imm.core import distributed
from imm.core.config import ConfigError, load_yaml
from imm.core.distributed import full_state_dict
from imm.io.checkpoint import (
    CheckpointError,
    build_network,
    check_state_dict,
    read_checkpoint,
    sampling_settings,
    save_weights,
)
from imm.training.phema import PowerEMA, reconstruction_weights, sigma_rel_to_gamma

_PHEMA_SNAPSHOT = re.compile(r"phema-([0-9]+)-([0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?)\.safetensors")


def phema_snapshot_path(run_dir: Path, step: int, sigma_rel: float) -> Path:
    """``RUN/phema/phema-STEP-SIGMA_REL.safetensors``; the width is written as Python's round-trip repr."""
    return run_dir / "phema" / f"phema-{step:08d}-{sigma_rel!r}.safetensors"


def phema_snapshots(run_dir: Path) -> list[tuple[int, float, Path]]:
    """The run's post-hoc EMA snapshots as (step, sigma_rel, path), oldest first."""
    found = []
    for path in (run_dir / "phema").glob("phema-*.safetensors"):
        match = _PHEMA_SNAPSHOT.fullmatch(path.name)
        if match:
            found.append((int(match[1]), float(match[2]), path))
    return sorted(found)


def save_phema_snapshots(run_dir: Path, step: int, tracker: PowerEMA) -> None:
    """Write each profile of ``tracker`` after ``step`` steps as an ordinary network file (atomically)."""
    for sigma_rel, ema in tracker.emas.items():
        tensors = full_state_dict(ema)  # on every rank: gathers FSDP2 shards
        if distributed.is_main():
            save_weights(tensors, ema.config, phema_snapshot_path(run_dir, step, sigma_rel))


def drop_snapshots_after(run_dir: Path, step: int) -> None:
    """Delete the snapshots after ``step`` that a run stopped past its last checkpoint left: the resumed run
    writes them again, from the profiles as they were at ``step``."""
    if distributed.is_main():
        for snapshot_step, _, path in phema_snapshots(run_dir):
            if snapshot_step > step:
                path.unlink(missing_ok=True)


def _sampling_settings_of_run(run_dir: Path) -> dict | None:
    """The encoder/sampling/eval sections of ``RUN/config.yaml`` (None when it is missing or unreadable)."""
    import yaml

    try:
        cfg = load_yaml((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return sampling_settings(cfg)



def reconstruct_run(run_dir, sigma_rels, out, progress: bool = True) -> list[Path]:
    """``imm ema reconstruct``: the EMA of each relative width in ``sigma_rels`` at the run's newest snapshot,
    combined from all its snapshots with the weights of :func:`imm.training.phema.reconstruction_weights`, written as
    ``OUT/phema-SIGMA_REL.safetensors`` (networks that ``imm.load_network`` and ``imm generate`` read).

    Parameters are summed in float64 and stored in the snapshots' dtype; buffers (which EMAs copy rather
    than average) come from the newest snapshot. Bad input is one CheckpointError or ConfigError line."""
    from tqdm import tqdm

    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    snapshots = phema_snapshots(run_dir)
    if not snapshots:
        raise CheckpointError(f"{run_dir / 'phema'}: no post-hoc EMA snapshots (they are written every "
                              "training.phema_snapshot_every steps of a run with training.phema=true)")
    sigma_rels = [float(s) for s in sigma_rels]
    if not sigma_rels:
        raise ConfigError("give at least one sigma_rel to reconstruct")
    try:
        gammas = [sigma_rel_to_gamma(s) for _, s, _ in snapshots]
        weights = {s: reconstruction_weights([t for t, _, _ in snapshots], gammas, s) for s in sigma_rels}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    settings = _sampling_settings_of_run(run_dir)  # so that imm generate / eval fid need no --config
    config = sums = buffers = None
    for i, (step, _, path) in enumerate(tqdm(snapshots, desc="imm ema reconstruct", unit="snapshot",
                                             disable=not progress)):
        file_config, tensors = read_checkpoint(path)
        if config is None:
            if file_config is None:
                raise CheckpointError(f"{path}: carries no network configuration")
            config = file_config
            with torch.device("meta"):
                meta_net = build_network(config, source=str(path))
            params = {name for name, _ in meta_net.named_parameters()}
            dtypes = {k: tensors[k].dtype for k in tensors}
            sums = {s: {k: torch.zeros(tensors[k].shape, dtype=torch.float64) for k in params} for s in sigma_rels}
        elif file_config != config:
            raise CheckpointError(f"{path}: a different network configuration than {snapshots[0][2].name}")
        check_state_dict(meta_net, tensors, source=str(path))
        for s in sigma_rels:
            for k in params:
                sums[s][k].add_(tensors[k].to(torch.float64), alpha=float(weights[s][i]))
        if step == snapshots[-1][0]:
            buffers = {k: v for k, v in tensors.items() if k not in params}
    paths = []
    for s in sigma_rels:
        path = out / f"phema-{s!r}.safetensors"
        save_weights({**{k: v.to(dtypes[k]) for k, v in sums[s].items()}, **buffers}, config, path, settings)
        paths.append(path)
    return paths
