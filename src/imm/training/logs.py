"""What ``imm train`` writes besides checkpoints: ``metrics.jsonl``, TensorBoard and W&B logs
(:class:`Logger`), the running sums behind each log line (:class:`StepWindow`, with the loss per t-bin of
:data:`T_BINS`), sample grids and toy scatter plots of the EMA (:class:`SampleGrids`) and the periodic
small-N FID (:class:`PeriodicFID`). The loop itself is ``imm.training.loop.train``, which runs them at their
ticks.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from imm.core import distributed
from imm.core.fastpath import FastPath
from imm.core.files import open_append, write_text
from imm.evaluation.sampling_run import step_entries
from imm.io.images import save_grid
from imm.methods.registry import entry_sampler
from imm.model.precision import sampling_network
from imm.training.config import LoggingSection

T_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)  # loss_by_t/ bins of the log


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl up to ``step`` only: a resumed run logs the later steps again, and
    a kill may have torn the last line. Rewritten atomically, and only when a line goes."""
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    keep = [line for line in lines if logged_step(line) <= step]
    if len(keep) < len(lines):
        write_text(path, "".join(line + "\n" for line in keep))


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line that is not one (torn by a kill)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class Logger:
    """metrics.jsonl, TensorBoard (and W&B when asked and installed) on the main process."""

    def __init__(self, run_dir: Path, log: LoggingSection, start_step: int, run_config: dict | None = None):
        """``log``: the config's logging section; ``run_config``: the whole config, which W&B records."""
        self.enabled = distributed.is_main()
        self.tb = self.wandb = None
        if not self.enabled:
            return
        drop_metrics_after(run_dir / "metrics.jsonl", start_step)
        self.jsonl = open_append(run_dir / "metrics.jsonl")
        if log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("imm train: tensorboard is not installed; logging to metrics.jsonl only")
        if log.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project="imm", dir=str(run_dir), config=run_config, resume="allow")
            except ImportError:
                print("imm train: wandb is not installed; logging.wandb ignored")

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def image(self, step: int, tag: str, images_uint8: torch.Tensor) -> None:
        if self.enabled and self.tb:
            from imm.io.images import to_hwc

            grid = to_hwc(images_uint8)
            self.tb.add_images(tag, grid, step, dataformats="NHWC")

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb:
                self.tb.close()
            if self.wandb:
                self.wandb.finish()


class SampleGrids:
    """EMA samples at each of ``logging.sample_steps`` (a uniform-grid entry each, sampled by the
    ``loss.kind``'s entry sampler) as PNG grids, from the same ``logging.sample_count`` noises (seeded by
    ``training.seed``) every time; for a toy 2-D target (``toy2d``: its name) one scatter plot of them
    instead (:func:`toy_scatter`). Sampled in the run's precision and layout (``fast``, a
    :class:`imm.core.fastpath.FastPath`)."""

    def __init__(self, log: dict, seed: int, method: str, toy2d: str | None = None, fast: FastPath = FastPath()):
        self.entries, self.count = step_entries(int(n) for n in log["sample_steps"]), int(log["sample_count"])
        self.seed, self.sample, self.toy2d, self.fast = int(seed), entry_sampler(method), toy2d, fast

    @torch.no_grad()
    def __call__(self, ema, encoder, run_dir: Path, step: int, logger: Logger, device) -> list[Path]:
        n = self.count
        g = torch.Generator().manual_seed(self.seed)
        x_T = torch.randn(n, ema.img_channels, ema.img_resolution, ema.img_resolution, generator=g) * ema.sigma_data
        labels = torch.arange(n) % ema.label_dim if ema.label_dim else None
        paths, points = [], {}
        was_training = ema.training
        ema.eval()
        net = sampling_network(ema, self.fast.dtype, self.fast.torch_memory_format)
        for entry in self.entries.values():
            steps = entry.num_steps
            x = self.sample(net, x_T.to(device), None if labels is None else labels.to(device), **entry.kwargs())
            images = encoder.decode(x).cpu()
            if images.dtype != torch.uint8 or not distributed.is_main():  # toy 2-D points: the scatter plot below
                points[steps] = images.reshape(n, -1).float()
                continue
            path = run_dir / "samples" / f"step{step:08d}_{steps}step.png"
            save_grid(images, path)
            logger.image(step, f"samples/{steps}step", images)
            paths.append(path)
        ema.train(was_training)
        if points and self.toy2d and distributed.is_main():
            paths.append(toy_scatter(points, self.toy2d, run_dir / "samples" / f"step{step:08d}_scatter.png", step,
                                     logger))
        return paths


def toy_scatter(points: dict, toy2d: str, path: Path, step: int, logger) -> Path:
    """Toy 2-D runs: the samples of each step count over points of the target ``toy2d``, in one figure, with
    the sliced W2 of each against the target (``imm.evaluation.toy_metrics.toy2d_sliced_w2``), logged as ``sw2/{n}step``
    and printed."""
    from imm.evaluation.toy_metrics import toy2d_sliced_w2
    from imm.io.images import save_scatter

    sw2, target = toy2d_sliced_w2(points, toy2d)
    save_scatter({f"{k} step{'s' * (k > 1)}: sliced W2 {sw2[k]:.3f}": x for k, x in points.items()}, path, target)
    logger.scalars(step, {f"sw2/{k}step": v for k, v in sw2.items()})
    print(f"imm train: {toy2d} samples, sliced W2 to the target: "
          + ", ".join(f"{k} step{'s' * (k > 1)} {v:.3f}" for k, v in sw2.items()) + f" ({path})")
    return path


class PeriodicFID:
    """FID of the EMA every ``logging.fid_every`` steps on ``fid_num_images`` samples per step count,
    against ``logging.fid_ref`` (small-N FID: comparable between steps of one run, not with FID-50K),
    logged as ``fid/{n}step``; with ``logging.fid_metrics=[fid,fd_dinov2]`` also FD_DINOv2 (DINOv2 model
    ``logging.fid_dinov2``, a hub id or folder) on the same images, as ``fd_dinov2/{n}step``. Each step count
    is a uniform-grid entry sampled by the ``loss.kind``'s entry sampler, in the run's precision and layout
    (``fast``)."""

    def __init__(self, log: dict, seed: int, method: str, device, fast: FastPath = FastPath()):
        """``log``: the config's logging section; ``seed``: the first sample's seed (``training.seed``)."""
        from imm.evaluation.evaluate import load_reference, metric_networks, parse_metrics

        metrics = parse_metrics(log["fid_metrics"], "logging.fid_metrics")
        refs = {m: load_reference(log["fid_ref"], m) for m in metrics}  # fails at start when missing or malformed
        self.sets = metric_networks(log["fid_ref"], refs, device, dinov2=log["fid_dinov2"])
        self.entries, self.sample = step_entries(log["fid_steps"]), entry_sampler(method)
        self.num_images, self.seed, self.device, self.fast = int(log["fid_num_images"]), int(seed), device, fast

    def __call__(self, ema, encoder, step: int, logger) -> None:
        import warnings

        from imm.evaluation.evaluate import network_distances

        was_training = ema.training
        ema.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small-N bias warning: documented above
            net = sampling_network(ema, self.fast.dtype, self.fast.torch_memory_format)
            rows = network_distances(net, encoder, self.sets, self.entries, self.num_images, 64, self.seed,
                                     self.device, progress=False, sample_fn=self.sample)
        ema.train(was_training)
        if rows:
            logger.scalars(step, {f"{m}/{row['steps']}step": row[m] for row in rows for m in self.sets})


# ---------------------------------------------------------------------------------------------
# Per-step sums


class StepWindow:
    """Running sums over a logging interval, kept on the device; :meth:`flush` reads them in one host sync
    per log line."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        z = lambda: torch.zeros((), device=self.device, dtype=torch.float64)  # noqa: E731
        self.loss, self.count, self.gnorm, self.steps, self.nonfinite = z(), z(), z(), 0, z()
        self.bin_loss = torch.zeros(len(T_BINS) - 1, device=self.device, dtype=torch.float64)
        self.bin_count = torch.zeros_like(self.bin_loss)
        self.start = time.perf_counter()

    def add(self, loss, stats):
        self.loss += loss.to(torch.float64)
        self.count += 1
        self.nonfinite += stats["nonfinite"].to(torch.float64)
        group_loss, t = stats["loss"].to(torch.float64), stats["t"].to(torch.float64)
        finite = torch.isfinite(group_loss)
        idx = torch.bucketize(t, torch.tensor(T_BINS[1:-1], device=t.device, dtype=t.dtype))
        self.bin_loss.index_add_(0, idx, torch.where(finite, group_loss, 0))
        self.bin_count.index_add_(0, idx, finite.to(torch.float64))

    def grad_norm(self, g):
        self.gnorm += torch.nan_to_num(g.to(torch.float64), nan=0.0, posinf=0.0)
        self.steps += 1

    def flush(self, global_batch: int, lr: float) -> dict:
        """The interval's means, read from the device in one transfer, and a fresh window."""
        elapsed = time.perf_counter() - self.start
        bins = len(self.bin_loss)
        values = torch.cat([torch.stack([self.loss / self.count.clamp(min=1), self.gnorm / max(self.steps, 1),
                                         self.nonfinite]),
                            self.bin_loss / self.bin_count.clamp(min=1), self.bin_count]).tolist()  # the host sync
        loss, gnorm, nonfinite, means, counts = *values[:3], values[3:3 + bins], values[3 + bins:]
        out = {"train/loss": loss, "train/grad_norm": gnorm, "train/lr": lr, "train/nonfinite_groups": nonfinite,
               "train/images_per_s": global_batch * self.steps / max(elapsed, 1e-9),
               "train/steps_per_s": self.steps / max(elapsed, 1e-9)}
        for (lo, hi), v, n in zip(zip(T_BINS[:-1], T_BINS[1:]), means, counts):
            if n:
                out[f"loss_by_t/{lo:.2f}-{hi:.2f}"] = v
        self.reset()
        return out
