"""``imm push``: a run or a checkpoint as a Hugging Face Hub model repository, uploaded in one commit.

The repository holds, at its root:

* ``network.safetensors``: the network with the sampling settings ``imm generate`` reads (``imm generate
  --checkpoint hf://OWNER/REPO`` samples it);
* the diffusers pipeline of :mod:`imm.interop.export` (``model_index.json``, ``network/``, ``scheduler/``,
  ``vae/`` for a VAE that is not a known Hub id), so ``IMMPipeline.from_pretrained("OWNER/REPO")`` loads it;
* ``config.yaml``: a run's training config, when the source is a run folder;
* ``README.md``: the model card (``huggingface_hub.ModelCard``): metadata (``library_name``, ``pipeline_tag``,
  tags, license, datasets) and a body with the method, the network, the training settings, the FIDs the run
  measured (with their sample count and reference) and the commands that sample it.

``--dry-run`` builds the same folder locally and lists it; otherwise ``huggingface_hub`` uploads it
(``create_repo``, then ``upload_folder``: one commit) with the token of its own login (``hf auth login``).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

from imm.core.config import load_yaml
from imm.core.errors import InputError
from imm.interop.export import Source, build_pipeline, read_source, write_folder
from imm.io import hub
from imm.io.checkpoint import sampling_settings, save_network
from imm.training.logs import logged_step

METHOD_NAMES = {"imm": "Inductive Moment Matching (Zhou, Ermon, Song, ICML 2025)",
                "flow_matching": "flow matching (Lipman et al., ICLR 2023), sampled with an ODE solver",
                "consistency": "consistency training (Song et al., ICML 2023)",
                "meanflow": "MeanFlow (Geng et al., 2025): average velocities"}
KNOWN_DATASETS = {"mnist": "mnist", "cifar10": "cifar10", "imagenet": "imagenet-1k"}  # a name -> its Hub dataset id


def parse_repo(target: str) -> str:
    """``hf://OWNER/REPO`` (or ``OWNER/REPO``) -> ``OWNER/REPO``."""
    name = target[len(hub.SCHEME):] if target.startswith(hub.SCHEME) else target
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or "@" in name:
        raise InputError(f"{target}: name the repository as hf://OWNER/REPO")
    return name


def run_folder(source) -> Path | None:
    path = Path(str(source)).expanduser()
    return path if path.is_dir() else None


def run_config(run: Path | None) -> dict | None:
    """A run folder's training config (``RUN/config.yaml``, read within :func:`imm.core.config.load_yaml`'s
    bounds), or None."""
    if run is None or not (run / "config.yaml").is_file():
        return None
    return load_yaml((run / "config.yaml").read_text()) or {}


def measured_fids(run: Path | None, cfg: dict | None) -> list[dict]:
    """The FIDs a run folder holds: ``RUN/fid/fid.json`` (``imm demo``, ``imm eval fid --out RUN/fid``) and
    the last periodic FID of each step count in ``RUN/metrics.jsonl`` (``logging.fid_every``, with the sample
    count and reference of the run's config ``cfg``); each a row with ``steps``, ``fid``, ``num_images``,
    ``ref`` and ``where``."""
    if run is None:
        return []
    rows = []
    table = run / "fid" / "fid.json"
    if table.is_file():
        data = json.loads(table.read_text())
        rows += [{"steps": r["steps"], "fid": r["fid"], "num_images": r["num_images"], "ref": data.get("ref", "?"),
                  "where": "fid/fid.json"} for r in data.get("results", []) if "fid" in r]
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        logging = (cfg or {}).get("logging") or {}
        last = {}
        for line in metrics.read_text().splitlines():
            if logged_step(line) == math.inf:  # a line torn by a kill
                continue
            record = json.loads(line)
            for key, value in record.items():
                if key.startswith("fid/") and key.endswith("step"):
                    last[int(key[4:-4])] = (record["step"], value)
        rows += [{"steps": steps, "fid": value, "num_images": logging.get("fid_num_images", "?"),
                  "ref": logging.get("fid_ref", "?"), "where": f"metrics.jsonl, training step {step}"}
                 for steps, (step, value) in sorted(last.items())]
    return rows


def dataset_id(cfg: dict | None) -> str:
    """The Hub dataset id of a training config's dataset when it is a known one, else ''."""
    dataset = (cfg or {}).get("dataset") or {}
    named = str(dataset.get("name") or dataset.get("kind") or dataset.get("path") or "").lower()
    return next((hub_id for key, hub_id in KNOWN_DATASETS.items() if key in named), "")


def model_card(repo_id: str, source: Source, run: Path | None, license: str):
    """The ``huggingface_hub.ModelCard`` of the repository (see the module docstring)."""
    from huggingface_hub import ModelCard, ModelCardData

    net, method = source.run.net, source.run.method
    cfg = run_config(run)
    dataset = dataset_id(cfg)
    encoder = dict(source.config.get("encoder") or {})
    tags = ["imm", "few-step-generation", method.replace("_", "-"), "diffusers"]
    data = ModelCardData(library_name="imm", pipeline_tag="unconditional-image-generation", tags=tags,
                         license=license, datasets=[dataset] if dataset else None)
    params = sum(p.numel() for p in net.parameters())
    classes = f"{net.label_dim} classes" if net.label_dim else "unconditional"
    lines = [f"# {repo_id.split('/')[1]}", "",
             f"A few-step generative network trained by {METHOD_NAMES.get(method, method)} (`loss.kind: "
             f"{method}`), packaged by the `imm` toolkit.", "",
             "## Network", "",
             "| | |", "|---|---|",
             f"| backbone | `{net.config.get('model_type')}`, {params / 1e6:.2f}M parameters |",
             f"| samples | {net.img_channels} x {net.img_resolution} x {net.img_resolution}, {classes} |",
             f"| parameterisation | `f_type: {net.f_type}`, `noise_schedule: {net.noise_schedule}`, T = {net.T}, "
             f"eps = {net.eps}, sigma_data = {net.sigma_data} |",
             f"| encoder | `{encoder.get('kind', 'rgb')}`" + (f" (`{encoder['vae_name']}`)" if encoder.get("vae_name") else "")
             + " |", "", "## Training", ""]
    if cfg:
        training, optimizer = cfg.get("training") or {}, cfg.get("optimizer") or {}
        lines += [f"- `{k}`: {v}" for k, v in (
            ("dataset", (cfg.get("dataset") or {}).get("kind")), ("training.total_steps", training.get("total_steps")),
            ("training.batch_size", training.get("batch_size")), ("training.precision", training.get("precision")),
            ("optimizer.lr", optimizer.get("lr"))) if v is not None]
        lines += ["", "The whole training config is `config.yaml` in this repository."]
    else:
        lines += [f"Not recorded: the source was a checkpoint file (`{Path(source.path).name}`), not a run folder."]
    lines += ["", "## Measured", ""]
    fids = measured_fids(run, cfg)
    if fids:
        lines += ["| sampling steps | FID | samples | reference | from |", "|---|---|---|---|---|"]
        lines += [f"| {r['steps']} | {r['fid']:.2f} | {r['num_images']} | `{r['ref']}` | {r['where']} |" for r in fids]
        lines += ["", "A FID of fewer samples than 50,000 is biased upwards: compare it only with FIDs of as many."]
    else:
        lines += ["No FID is recorded with this " + ("run." if run is not None else "checkpoint file.")]
    entries = list(source.run.entries)
    lines += ["", "## Sample", "", "With imm (`pip install imm`), one sample grid per sampling entry "
              f"({', '.join(f'`{e}`' for e in entries)}):", "", "```bash",
              f"imm generate --checkpoint hf://{repo_id} --out samples", "```", "",
              'With diffusers (`pip install "imm[diffusers]"`):', "", "```python",
              "from imm import IMMPipeline", f'pipe = IMMPipeline.from_pretrained("{repo_id}")',
              f'images = pipe(batch_size=4, entry="{entries[0]}").images' if entries else
              "images = pipe(batch_size=4, num_inference_steps=1).images", "```", ""]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines))


def build_repo(source_path, repo_id: str, folder: Path, config: str | None = None, overrides=(),
               network_overrides=None, license: str = "apache-2.0") -> None:
    """Write the repository's files (see the module docstring) into the empty folder ``folder``."""
    source = read_source(source_path, config, overrides, network_overrides)
    run = run_folder(source_path)
    build_pipeline(source).save_pretrained(folder, safe_serialization=True)
    save_network(source.run.net, folder / hub.REPO_NETWORK, sampling_settings(source.config))
    if run is not None and (run / "config.yaml").is_file():
        shutil.copyfile(run / "config.yaml", folder / "config.yaml")
    model_card(repo_id, source, run, license).save(folder / "README.md")


def push(source_path, target: str, private: bool = False, dry_run: bool = False, out=None,
         config: str | None = None, overrides=(), network_overrides=None, license: str = "apache-2.0",
         overwrite: bool = False) -> tuple[str, list[str], Path | None]:
    """Build the repository of ``source_path`` for ``target`` (``hf://OWNER/REPO``) and upload it in one
    commit, or with ``dry_run`` write it to ``out`` (default ``./OWNER--REPO``). Returns (the repository id,
    its files, the local folder for a dry run or None)."""
    repo_id = parse_repo(target)
    if dry_run:
        out = Path(out or repo_id.replace("/", "--"))
        write_folder(out, lambda folder: build_repo(source_path, repo_id, folder, config, overrides,
                                                    network_overrides, license), overwrite)
        return repo_id, _files(out), out
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="imm-push-") as tmp:
        folder = Path(tmp)
        build_repo(source_path, repo_id, folder, config, overrides, network_overrides, license)
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                              commit_message=f"imm push of {Path(str(source_path)).name}")
        except Exception as e:  # no token, no network, no permission: huggingface_hub's message, one line
            raise hub.HubError(f"pushing to hf://{repo_id} failed ({hub.first_line(e)}); log in with "
                               "`hf auth login` and check that the repository is yours") from None
        return repo_id, _files(folder), None


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
