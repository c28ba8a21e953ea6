"""A real one-node SLURM cluster for the tests (Debian's ``slurm-wlm`` and ``munge``), started as root in a
temporary folder and stopped after: ``munged`` with a fresh key, ``slurmctld`` and ``slurmd`` with a
``slurm.conf`` for this host (``man slurm.conf``): its short hostname and CPUs, its own ports, no cgroups
(``proctrack/linuxproc``, ``task/none``), no accounting. :func:`missing` names what it cannot run without."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers import poll

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue")


def missing() -> str | None:
    """Why a cluster cannot be started here (a reason naming the packages), or None."""
    absent = [p for p in PROGRAMS if shutil.which(p) is None]
    if absent:
        return f"needs Debian's slurm-wlm and munge packages ({', '.join(absent)} not found)"
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The running cluster: ``env`` (``SLURM_CONF`` and the PATH) for its client commands, ``run(...)`` one of
    them, ``stop()`` everything it started."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.pids: list[Path] = []
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "munge"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        key = folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf = folder / "slurm.conf"
        self.conf.write_text(f"""ClusterName=imm-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={folder / 'munge' / 'socket'}
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'slurmctld.log'}
SlurmdLogFile={folder / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={folder / 'munge' / 'socket'}",
                        f"--pid-file={folder / 'munge' / 'munged.pid'}", f"--log-file={folder / 'munge' / 'log'}",
                        f"--seed-file={folder / 'munge' / 'seed'}"], check=True, capture_output=True, timeout=60)
        self.pids.append(folder / "munge" / "munged.pid")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(self.conf)], check=True, env=self.env, capture_output=True, timeout=60)
            self.pids.append(folder / f"{daemon}.pid")
        self.wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T").stdout, "the node to be idle", 60)

    def run(self, *command: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=120, check=check)

    def wait(self, condition, what: str, seconds: float):
        """Poll ``condition()`` until truthy (returned) or ``seconds`` pass (then AssertionError with the logs)."""
        value = poll(condition, seconds, 0.5)
        if value:
            return value
        logs = "".join(p.read_text()[-1500:] for p in self.folder.glob("slurm*.log"))
        raise AssertionError(f"waited {seconds} s for {what}; the daemons' logs end with:\n{logs}")

    def job_state(self, job: str) -> str:
        """The state ``scontrol show job`` reports (PENDING, RUNNING, COMPLETED, ...), '' once it is gone."""
        out = self.run("scontrol", "show", "job", job).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")

    def stop(self) -> None:
        for pid_file in reversed(self.pids):
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                pass
        time.sleep(1)
