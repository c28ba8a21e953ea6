"""``imm explore``: a local web page (Gradio, https://www.gradio.app) that samples one checkpoint as the user
turns its knobs: a recorded sampling entry or 1-8 steps on the uniform grid, the middle time of a 2-step
sample, guidance scale and interval for a class-conditional network, class labels, seed and image count.
A second panel samples other settings from the same noise, side by side.

:class:`Explorer` is the page's model, with no Gradio in it: one copy of the network, its method's
sampler (as ``imm generate``: :func:`imm.methods.registry.entry_sampler`) and its encoder, a lock so that one
request samples at a time, and the caps of :data:`LIMITS`. A bad value is an :class:`ExploreError`, which
the page shows as a message; :func:`build_page` lays the page out, :func:`serve` runs it.
"""

from __future__ import annotations

import io
import math
import signal
import threading
import time
from dataclasses import dataclass

import torch
from PIL import Image

from imm.core.errors import ImmError, InputError
from imm.evaluation.evaluate import steps_and_nfe
from imm.evaluation.generate import seeded_inputs
from imm.evaluation.sampling_run import resolve_sampling_run, sampling_config
from imm.evaluation.toy_metrics import toy2d_sliced_w2
from imm.interop.export import checkpoint_file
from imm.io.images import grid_array, scatter_figure, to_pil
from imm.methods import registry as methods
from imm.model.sampling import SamplingEntry

LIMITS = {"images": 64, "steps": 8, "seed": 2**31 - 1}  # what one request may ask for
UNIFORM = "uniform grid"  # the entry choice that samples ``steps`` steps instead of a recorded entry
DISPLAY_WIDTH = 384  # a grid narrower than this is shown scaled up by a whole factor


class ExploreError(InputError):
    """A setting the page cannot sample; its message is shown on the page."""


@dataclass
class Sample:
    """What one request drew: the picture (a grid of images, or a scatter plot of 2-D points), the network
    evaluations per image, the seconds per image and a line that says what was drawn."""

    image: object  # PIL.Image
    nfe: int
    seconds_per_image: float
    caption: str


class Explorer:
    """One checkpoint, ready to sample (see the module docstring): ``checkpoint``, ``config`` and
    ``overrides`` as ``imm generate`` takes them."""

    def __init__(self, checkpoint, config: str | None = None, overrides=(), network_overrides=None,
                 device="cpu"):
        path = checkpoint_file(checkpoint)
        cfg, source = sampling_config(config, path, list(overrides))
        self.run = resolve_sampling_run(cfg, path, torch.device(device), source=source,
                                        network_overrides=network_overrides, load_encoder=False)
        self.net, self.method = self.run.net, self.run.method
        self.entries = dict(self.run.entries)
        self.toy_target = (cfg.get("dataset") or {}).get("name") if (cfg.get("dataset") or {}).get("kind") == "toy2d" else None
        self.points = self.net.img_resolution == 1  # a toy network makes 2-D points
        self.encoder_problem = None  # why samples cannot be decoded (a VAE that is not available), else None
        try:
            self.run.encoder.init(self.run.device)
        except ImmError as e:  # no diffusers, a VAE neither cached nor reachable, a folder that holds none
            self.encoder_problem = str(e).splitlines()[0]
        self.lock = threading.Lock()

    @property
    def conditional(self) -> bool:
        return bool(self.net.label_dim)

    def entry(self, choice: str, steps: int, mid_t: float | None = None, cfg_scale: float | None = None,
              cfg_interval: tuple[float, float] | None = None) -> SamplingEntry:
        """The sampling entry of the page's settings: the recorded entry ``choice``, or (``UNIFORM``) ``steps``
        uniform steps, a 2-step sample through the middle time ``mid_t`` when given; then the guidance."""
        if choice != UNIFORM:
            if choice not in self.entries:
                raise ExploreError(f"unknown sampling entry {choice!r}; the checkpoint records {', '.join(self.entries)}")
            entry = self.entries[choice]
        else:
            steps = _integer(steps, "steps", 1, LIMITS["steps"])
            if mid_t is not None and steps == 2:
                t = _number(mid_t, "the middle time", self.net.eps, self.net.T, open_interval=True)
                mid_nt = float(self.net.eta(torch.tensor(t, dtype=torch.float64)))
                entry = SamplingEntry(num_steps=2, mid_nt=(mid_nt,))
            else:
                entry = SamplingEntry.uniform(steps)
        if cfg_scale is not None or cfg_interval is not None:
            if not self.conditional:
                raise ExploreError("guidance needs a class-conditional network; this one is unconditional")
            if cfg_scale is not None:
                cfg_scale = _number(cfg_scale, "the guidance scale", 0.0, 100.0)
            if cfg_interval is not None:
                lo, hi = (_number(v, "the guidance interval", 0.0, 1.0) for v in cfg_interval)
                if lo > hi:
                    raise ExploreError(f"the guidance interval [{lo}, {hi}] is empty: its start is above its end")
                cfg_interval = (lo, hi)
                cfg_scale = entry.cfg_scale if cfg_scale is None else cfg_scale
                if cfg_scale is None:
                    raise ExploreError("a guidance interval needs a guidance scale")
            entry = entry.with_guidance(cfg_scale, cfg_interval)
        try:
            methods.check_entry(self.method, entry)
        except ValueError as e:
            raise ExploreError(str(e)) from None
        return entry

    def labels(self, text: str | None, count: int, drawn: torch.Tensor | None) -> torch.Tensor | None:
        """Class ids from ``text`` ("3", or "1, 2, 7" repeated to ``count`` images); the seeded ones when
        empty."""
        if not self.conditional:
            if text and text.strip():
                raise ExploreError("class labels need a class-conditional network; this one is unconditional")
            return None
        if not text or not text.strip():
            return drawn
        try:
            ids = [int(v) for v in text.replace(",", " ").split()]
        except ValueError:
            raise ExploreError(f"class labels are integers from 0 to {self.net.label_dim - 1}, got {text[:40]!r}") from None
        if not ids or len(ids) > LIMITS["images"] or min(ids) < 0 or max(ids) >= self.net.label_dim:
            raise ExploreError(f"class labels are 1 to {LIMITS['images']} integers from 0 to {self.net.label_dim - 1}, "
                               f"got {text[:40]!r}")
        return torch.tensor([ids[i % len(ids)] for i in range(count)], dtype=torch.long)

    def sample(self, entry: SamplingEntry, seed, count, labels_text: str | None = None) -> Sample:
        """``count`` samples of ``entry`` from seed ``seed`` (image i from seed + i, as ``imm generate``),
        one request at a time."""
        seed = _integer(seed, "the seed", 0, LIMITS["seed"])
        count = _integer(count, "the image count", 1, LIMITS["images"])
        if self.encoder_problem and not self.points:
            raise ExploreError(f"the samples cannot be decoded: {self.encoder_problem}")
        noise, drawn = seeded_inputs(self.net, range(count), seed)
        labels = self.labels(labels_text, count, drawn)
        with self.lock:
            start = time.perf_counter()
            g = torch.Generator(device=self.run.device).manual_seed(seed)
            x = self.run.sample_fn(self.net, noise.to(self.run.device),
                                   None if labels is None else labels.to(self.run.device), generator=g,
                                   **entry.kwargs())
            decoded = self.run.encoder.decode(x).cpu()
            seconds = (time.perf_counter() - start) / count
        steps, nfe = steps_and_nfe(self.net, entry)
        caption = f"{count} sample{'s' * (count > 1)}, {steps} step{'s' * (steps > 1)}"
        if labels is not None:
            caption += f", classes {labels.tolist() if count <= 16 else labels[:16].tolist() + ['...']}"
        image = self._scatter(decoded) if decoded.dtype != torch.uint8 else to_pil(grid_array(decoded))
        return Sample(image, nfe, seconds, caption)

    def _scatter(self, points: torch.Tensor):
        """2-D points over the toy target (when the checkpoint names it), as a PIL image."""
        points = points.reshape(points.shape[0], -1).float()
        target, title = None, f"{points.shape[0]} samples"
        if self.toy_target:
            sw2, target = toy2d_sliced_w2({"x": points}, self.toy_target)
            title += f", sliced W2 {sw2['x']:.3f}"
        buffer = io.BytesIO()
        scatter_figure({title: points}, buffer, target)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")


def _integer(value, what: str, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ExploreError(f"{what} must be an integer from {low} to {high}, got {str(value)[:40]!r}") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise ExploreError(f"{what} must be an integer from {low} to {high}, got {str(value)[:40]!r}")
    return int(number)


def _number(value, what: str, low: float, high: float, open_interval: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    inside = low < number < high if open_interval else low <= number <= high
    if not (math.isfinite(number) and inside):
        bounds = f"between {low} and {high}" + (" (exclusive)" if open_interval else "")
        raise ExploreError(f"{what} must be a number {bounds}, got {str(value)[:40]!r}")
    return number


# --- the page -------------------------------------------------------------------------------------------

def describe(explorer: Explorer) -> str:
    net = explorer.net
    what = "2-D points" if explorer.points else f"{net.img_channels} x {net.img_resolution} x {net.img_resolution} images"
    classes = f"{net.label_dim} classes" if net.label_dim else "unconditional"
    line = (f"**{explorer.run.checkpoint}**: `{net.config.get('model_type')}`, {what}, {classes}, sampled by "
            f"`{explorer.method}`'s sampler")
    if explorer.encoder_problem and not explorer.points:
        line += f"\n\n**Samples cannot be decoded here**: {explorer.encoder_problem}"
    return line


def panel_request(explorer: Explorer, choice, steps, mid_t, use_mid_t, cfg_scale, use_cfg, cfg_lo, cfg_hi, labels,
                  seed, count):
    """One panel's sample from the page's values: (the image, its caption with NFE and time) or (None, the
    message of a bad value)."""
    try:
        guided = bool(use_cfg) and explorer.conditional
        entry = explorer.entry(choice, steps, mid_t if use_mid_t else None, cfg_scale if guided else None,
                               (cfg_lo, cfg_hi) if guided and (cfg_lo, cfg_hi) != (0.0, 1.0) else None)
        got = explorer.sample(entry, seed, count, labels)
    except ExploreError as e:
        return None, f"**Not sampled**: {e}"
    return _enlarged(got.image), f"**{got.nfe} NFE**, {got.seconds_per_image * 1000:.1f} ms per image: {got.caption}"


def _enlarged(image, width: int = DISPLAY_WIDTH):
    """A small grid scaled up by a whole factor (nearest neighbour: every pixel stays a square of one value)."""
    factor = max(1, width // image.size[0])
    return image if factor == 1 else image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST)


def build_page(explorer: Explorer):
    """The Gradio page of ``explorer``: two panels of settings over the same seed and image count."""
    import gradio as gr

    choices = [UNIFORM, *explorer.entries]
    t_lo, t_hi = float(explorer.net.eps), float(explorer.net.T)
    with gr.Blocks(title="imm explore") as page:
        gr.Markdown(describe(explorer))
        with gr.Row():
            seed = gr.Number(value=0, precision=0, label="seed (image i uses seed + i)", elem_id="seed")
            count = gr.Slider(1, LIMITS["images"], value=16, step=1, label="images", elem_id="count")
            button = gr.Button("Sample", variant="primary", elem_id="sample")
        panels = []
        with gr.Row():
            for side, default_steps in (("a", 1), ("b", 2)):
                with gr.Column():
                    controls = [
                        gr.Dropdown(choices, value=UNIFORM, label="sampling entry", elem_id=f"entry-{side}"),
                        gr.Slider(1, LIMITS["steps"], value=default_steps, step=1, label="steps (uniform grid)",
                                  elem_id=f"steps-{side}"),
                        gr.Slider(round(t_lo, 3) + 0.001, round(t_hi, 3) - 0.001, value=0.5, step=0.01,
                                  label="middle time t of a 2-step sample", elem_id=f"mid-{side}"),
                        gr.Checkbox(value=False, label="use the middle time", elem_id=f"use-mid-{side}")]
                    with gr.Group(visible=explorer.conditional):
                        controls += [
                            gr.Number(value=1.5, label="guidance scale", elem_id=f"cfg-{side}"),
                            gr.Checkbox(value=False, label="guide", elem_id=f"use-cfg-{side}"),
                            gr.Slider(0, 1, value=0.0, step=0.01, label="guide from t", elem_id=f"cfg-lo-{side}"),
                            gr.Slider(0, 1, value=1.0, step=0.01, label="guide to t", elem_id=f"cfg-hi-{side}"),
                            gr.Textbox(value="", label="class labels (e.g. 3 or 1, 2, 7; empty: drawn from the seed)",
                                       elem_id=f"labels-{side}")]
                    if not explorer.conditional:  # the same arguments, unused
                        controls += [gr.State(None), gr.State(False), gr.State(0.0), gr.State(1.0), gr.State("")]
                    image = gr.Image(type="pil", label=f"panel {side.upper()}", elem_id=f"image-{side}")
                    caption = gr.Markdown(elem_id=f"caption-{side}")
                    panels.append((controls, image, caption))

        def run(*values):
            half = (len(values) - 2) // 2
            seed_value, count_value = values[-2:]
            out = []
            for controls in (values[:half], values[half:2 * half]):
                out += panel_request(explorer, *controls, seed_value, count_value)
            return out

        inputs = [c for controls, _, _ in panels for c in controls] + [seed, count]
        outputs = [o for _, image, caption in panels for o in (image, caption)]
        button.click(run, inputs=inputs, outputs=outputs, concurrency_limit=1)
        page.load(run, inputs=inputs, outputs=outputs)
    return page


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page of ``explorer`` on ``host:port`` (the loopback address unless the user asks for
    another); returns (the Gradio page, its URL). ``block``: until Ctrl-C or SIGTERM, then close it.

    The two signals are caught from before the server starts, so one that comes at any moment (even
    while it starts, or just as the address is printed) ends in the same clean close."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no requests to the outside
    page = build_page(explorer)
    page.queue(default_concurrency_limit=1, max_size=16)
    if not block:
        return page, _launch(page, host, port)
    stopped = []  # a flag the handler sets; a handler must not take a lock the interrupted code may hold
    previous = {sig: signal.signal(sig, lambda signum, frame: stopped.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = _launch(page, host, port)
        try:
            print(f"imm explore: serving {url} (Ctrl-C stops it)", flush=True)
            while not stopped:
                time.sleep(0.2)
            print("imm explore: stopped", flush=True)
        finally:
            page.close(verbose=False)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return page, url


def _launch(page, host: str, port: int) -> str:
    _, url, _ = page.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True,
                            quiet=True, footer_links=[], ssr_mode=False)
    return url
