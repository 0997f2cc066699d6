"""Worker processes that die with the process that started them.

`ProcessPoolExecutor`'s workers wait on their task queue; when the parent is killed with
SIGKILL (which no handler sees), they wait on, each holding its memory (two 300 MB render
workers were still alive 30 s after a `kill -9`). On Linux each worker asks the kernel to
send it SIGKILL when its parent dies (`prctl(PR_SET_PDEATHSIG)`); elsewhere the pool is
Python's own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request above was made
        os._exit(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool of `workers` whose processes end when this process ends, however it ends."""
    return ProcessPoolExecutor(workers, initializer=_die_with_parent, initargs=(os.getpid(),))
