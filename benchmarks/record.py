"""FIDs kept in git (``benchmarks/results/*.json``) so that a study grows across machines whose ``runs/`` is gone.

A record maps a run's name to ``{"recipe": {...}, KEY: {CELL: FID, ...}, "note": optional}``. The recipe is the
run's resolved training config, flattened to dotted keys, without what does not change the trained
weights (logging, sampling entries, the run's length, the warm start's file path). A recorded run answers
for a planned run only if every key of its recipe has the same value in the planned run's: keys only the
planned run has are ignored, so a setting whose default trains the same weights leaves a record valid,
while a changed value (a changed default included) voids it. Both recipes are compared in the canonical form
(:func:`imm.core.release.canonical`), so a record written with the release's keys (``loss.method``,
``encoder.class_name``, ``network.model_type``) answers for the canonical ``loss.kind`` ...
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from imm.core.config import flatten
from imm.core.release import canonical

NOT_RECIPE = ("logging.", "sampling.", "training.total_steps", "training.init_from")


def load(path: Path | None) -> dict:
    return json.loads(path.read_text()) if path is not None and path.exists() else {}


def save_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def recipe(cfg: dict, **extra) -> dict:
    """A resolved training config as the flat dict a record keeps (JSON types: tuples become lists)."""
    flat = {k: v for k, v in flatten(cfg).items() if not k.startswith(NOT_RECIPE)}
    return json.loads(json.dumps({**flat, **extra}))


def canonical_recipe(flat: dict) -> dict:
    """A flat recipe with its keys in the canonical form."""
    nested = {}
    for key, value in flat.items():
        *sections, last = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
    return flatten(canonical(nested))


def same_recipe(recorded: dict, now: dict) -> bool:
    recorded, now = canonical_recipe(recorded), canonical_recipe(now)
    return all(k in now and now[k] == v for k, v in recorded.items())


def cells(path: Path | None, run: str, now: dict, key: str) -> dict:
    """The recorded cells of ``run`` under ``key`` if its recipe is ``now``'s; else (or without a record) {}."""
    entry = load(path).get(run)
    if not entry:
        return {}
    if not same_recipe(entry["recipe"], now):
        print(f"{path.name}: the recorded {run} trained another recipe; not used", flush=True)
        return {}
    return entry.get(key, {})


def add(path: Path, run: str, now: dict, key: str, new_cells: dict, sort_key=None) -> None:
    """Merge ``new_cells`` into ``run``'s cells under ``key``, one process at a time (parallel workers
    share a record); a run retrained with another recipe replaces its old entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        everything = load(path)
        entry = everything.get(run)
        if entry is None or not same_recipe(entry["recipe"], now):
            entry = everything[run] = {"recipe": now}
        merged = {**entry.get(key, {}), **new_cells}
        entry[key] = dict(sorted(merged.items(), key=sort_key)) if sort_key else merged
        save_json(path, dict(sorted(everything.items())))
