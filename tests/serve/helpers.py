"""Shared by the serving tests that start a server in a process of its own."""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server_process(command: list[str], ready_url: str, timeout: float = 180):
    """`command` running until the block ends; yields the process once `ready_url` answers 200."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, process.stderr.read()[-3000:]
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{command[0]} did not answer {ready_url} within {timeout} s"
            time.sleep(0.3)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=60)
