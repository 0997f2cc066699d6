"""`make bench`'s load check: a probe sees another process busy on the machine, and figures taken
then are flagged with the reason."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import common  # noqa: E402 -- benchmarks/common.py, which the benchmark scripts import by name

pytestmark = pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="the probe reads Linux's /proc/stat")


def test_a_busy_process_beside_the_probe_is_seen_and_flags_the_figures():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        probe = common.load_probe(n=256, seconds=1.0)
    finally:
        busy.kill()
        busy.wait()
    share = 1 / os.cpu_count()  # one core of this many, kept busy by the loop
    assert probe["others_share"] > 0.6 * share
    assert probe["matmul_gflops"] > 0
    problem = common.load_problem([probe], best_gflops=probe["matmul_gflops"])
    assert problem and "other processes kept" in problem
    slow = {"matmul_gflops": 50.0, "others_share": 0.0}
    assert "80% of the run's best" in common.load_problem([slow], best_gflops=62.5)
    assert common.load_problem([slow], best_gflops=55.0) is None
