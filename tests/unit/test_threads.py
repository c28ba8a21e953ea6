"""imm.core.threads: the thread count follows the cores other processes leave free; --threads and
OMP_NUM_THREADS fix it."""
import subprocess
import sys
import time

import pytest
import torch

from imm import cli
from imm.core import threads


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    threads._adaptive = threads._source = None


@pytest.mark.parametrize("others, cores, expected", [
    (0.0, 2, 2), (0.2, 2, 2), (0.45, 2, 2), (0.8, 2, 1), (1.0, 2, 1), (2.0, 2, 1), (5.0, 16, 11), (0.0, 1, 1)])
def test_free_cores_rounds_what_others_leave(others, cores, expected):
    assert threads.free_cores(others, cores) == expected


def test_own_cpu_time_is_not_counted_as_others(monkeypatch, keep_threads):
    """Machine busy 1.5 cores over 10 s, of which this process used 1.0: others use 0.5 -> 2 threads of 2."""
    clock = {"wall": 100.0, "own": 5.0, "busy": 1000, "total": 2000}
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(threads.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(threads, "_busy_and_total_jiffies", lambda: (clock["busy"], clock["total"]))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    adaptive = threads.AdaptiveThreads(cores=2, check_every_s=5.0)
    clock.update(wall=110.0, own=15.0, busy=1000 + 1500, total=2000 + 2000)  # 2 cores x 10 s = 2000 ticks at 100 Hz
    assert adaptive.others_busy_cores() == pytest.approx(0.5)
    clock.update(wall=120.0, own=25.0, busy=2500 + 1900, total=4000 + 2000)  # others now 0.9 cores
    assert adaptive.adjust() == 1
    clock.update(wall=122.0)
    adaptive.maybe_adjust()  # 2 s after the last look: not yet
    assert torch.get_num_threads() == 1
    clock.update(wall=130.0, own=33.0, busy=4400 + 800, total=6000 + 2000)  # all of it ours: others idle again
    adaptive.maybe_adjust()
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/stat")
def test_a_busy_neighbour_is_seen_on_the_real_machine(keep_threads):
    neighbour = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\n"
                                  "while time.time() < end:\n    pass\n"])
    try:
        time.sleep(0.5)
        adaptive = threads.AdaptiveThreads()
        time.sleep(1.0)
        others = adaptive.others_busy_cores()
    finally:
        neighbour.kill()
        neighbour.wait()
    assert others is not None and others >= 0.7  # one core's worth at least (more if the machine is busier)


def test_threads_option_and_environment_fix_the_count(monkeypatch, keep_threads, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads.configure(1)
    assert torch.get_num_threads() == 1 and threads._adaptive is None
    assert threads.describe() == "1 thread, --threads"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    threads.configure(None)
    assert threads._adaptive is None and threads.describe().endswith(", OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads.configure(None)
    assert threads._adaptive is not None
    assert threads.describe().endswith(" following the cores other processes leave free")
    assert cli.main(["generate", "--threads", "0", "--checkpoint", "nothing.pt"]) == 2
    assert capsys.readouterr().err.strip() == "imm generate: error: --threads must be at least 1, got 0"
