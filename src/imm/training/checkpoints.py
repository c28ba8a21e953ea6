"""The run directory's training states, ``RUN/checkpoints/training-state-STEP.pt``: which there are, which one a
restart resumes from, which ones rotation deletes and which ones are set aside.

The files are written by :meth:`imm.training.state.TrainingState.save` and parsed, without running code from
them, by :func:`imm.io.checkpoint.read_training_state`. Three rules keep a good checkpoint from being lost:

* a restart resumes from the newest *readable* one; unreadable newer ones are renamed ``*.corrupt``
  (:func:`resume_state`), so rotation by step number never keeps them in place of readable ones;
* rotation counts only checkpoints whose next step had finite gradients (:class:`Rotation`);
* a run stopped by a streak of non-finite steps renames the checkpoints that lead into it ``*.diverged``
  (:func:`set_aside_diverged`): their next step is the streak's first whatever the learning rate.
"""

from __future__ import annotations

import re
from pathlib import Path

from imm.core import distributed
from imm.core.errors import StateError
from imm.core.files import check_subfolders
from imm.io.checkpoint import read_training_state


class TrainingError(StateError):
    """The run cannot start or cannot go on; the message says why."""


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"training-state-{step:08d}.pt"


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The run's checkpoints, ``training-state-STEP.pt``, oldest first."""
    paths = (run_dir / "checkpoints").glob("training-state-*.pt")
    return sorted((p for p in paths if re.fullmatch(r"training-state-[0-9]+\.pt", p.name)), key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("training-state-").removesuffix(".pt"))


def set_aside(paths: list[Path], suffix: str) -> None:
    """Rename checkpoints to NAME.pt + suffix (kept for inspection; never resumed or rotated)."""
    if distributed.is_main():
        for path in paths:
            path.replace(path.with_name(path.name + suffix))
    distributed.barrier()


RUN_SUBFOLDERS = ("checkpoints", "samples", "phema", "tensorboard")  # what the trainer writes into under RUN/


def tidy_run_folder(run_dir: Path) -> None:
    """Refuse a run folder whose subfolders are links or files (:func:`imm.core.files.check_subfolders`), then
    delete the temporary files (``.NAME.*.tmp``) that a kill during :func:`imm.core.files.atomic_write`
    left behind."""
    check_subfolders(run_dir, RUN_SUBFOLDERS)
    if distributed.is_main():
        for folder in (run_dir, *(run_dir / name for name in RUN_SUBFOLDERS)):
            for path in folder.glob(".*.tmp"):
                if path.is_file():
                    path.unlink(missing_ok=True)


def load_latest_state(run_dir: Path):
    """(path, state) of the newest readable training state (an unreadable newest one falls back to the one
    before); (None, None) when there is none."""
    for path in reversed(checkpoint_paths(run_dir)):
        try:
            return path, read_training_state(path)  # refuses anything but a training state
        except Exception as e:  # noqa: BLE001 - a torn or corrupt file: try the previous one
            if distributed.is_main():
                print(f"imm train: skipping unreadable checkpoint {path.name} ({type(e).__name__})")
    return None, None


def resume_state(run_dir: Path, start_over: bool = False):
    """:func:`load_latest_state`, with the unreadable checkpoints newer than the one it found renamed
    ``*.corrupt``. When there are checkpoints but none is readable, refuse, unless ``start_over`` (set them
    all aside and train from step 0)."""
    paths = checkpoint_paths(run_dir)
    path, state = load_latest_state(run_dir)
    unreadable = paths[paths.index(path) + 1:] if path is not None else paths
    if path is None and unreadable and not start_over:
        raise TrainingError(f"no readable checkpoint in {run_dir / 'checkpoints'} "
                            f"({', '.join(p.name for p in unreadable)} cannot be read); rerun with --start-over "
                            "(train(..., start_over=True)) to set them aside as *.corrupt and train from step 0")
    distributed.barrier()  # every rank has read before any file moves
    set_aside(unreadable, ".corrupt")
    return path, state


class Rotation:
    """Keeps the ``keep_last`` newest *good* checkpoints: those this run resumed from or wrote whose next step
    had finite gradients. Anything else (a checkpoint that led into non-finite steps, older files from before
    this start, never read and perhaps unreadable) counts for nothing, so rotation never deletes a good
    checkpoint in favour of them; older files go once ``keep_last`` good ones are newer (0: keep all)."""

    def __init__(self, run_dir: Path, keep_last: int, resumed_from: Path | None):
        self.run_dir, self.keep_last = run_dir, keep_last
        self.good: list[Path] = []
        self.pending = resumed_from  # the newest checkpoint, until its next step is known finite

    def written(self, path: Path) -> None:
        """``path`` was just written; it counts once the step after it is finite."""
        self.pending = path

    def finite_step(self) -> None:
        """The step just taken had finite gradients: the pending checkpoint is good."""
        if self.pending is not None:
            self.good.append(self.pending)
            self.pending = None
            self.rotate()

    def final(self, path: Path) -> None:
        """The end-of-run checkpoint: good, as nothing follows it."""
        self.good.append(path)
        self.rotate()

    def rotate(self) -> None:
        if not self.keep_last or len(self.good) < self.keep_last or not distributed.is_main():
            return
        oldest_kept = checkpoint_step(self.good[-self.keep_last])
        for path in checkpoint_paths(self.run_dir):
            if checkpoint_step(path) < oldest_kept:
                path.unlink(missing_ok=True)


def set_aside_diverged(run_dir: Path, step: int, streak: int, lr: float) -> str:
    """Set aside the checkpoints that lead into a streak of ``streak`` non-finite steps ending at ``step``
    (renamed ``*.diverged``) and say, in one line, what happened and where a rerun resumes."""
    first = step - streak
    doomed = [p for p in checkpoint_paths(run_dir) if checkpoint_step(p) >= first]
    set_aside(doomed, ".diverged")
    left = checkpoint_paths(run_dir)
    aside = f"; {', '.join(p.name for p in doomed)}, which they start from, is renamed *.diverged" if doomed else ""
    resume = f"{left[-1].name} (step {checkpoint_step(left[-1])})" if left else "step 0 (no earlier checkpoint)"
    return (f"{streak} steps in a row had non-finite gradients (steps {first + 1}-{step}); stopped without "
            f"writing a checkpoint{aside}. A rerun resumes from {resume}: lower the learning rate "
            f"(e.g. optimizer.lr={lr / 10:g}), use fp32/bf16, or check the data.")
