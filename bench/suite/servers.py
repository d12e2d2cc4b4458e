"""Starting a server process and waiting until it is ready, and reading its /metrics: for the suite and the tests.

Only the standard library and prometheus-client: the service's tests use it without the bench extra.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bench.suite.plan import ROOT

__all__ = ["Server", "free_port", "http_get", "metric", "metric_samples", "running", "wait_ready"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def wait_ready(process: subprocess.Popen[Any], url: str, timeout_s: float, name: str = "the server") -> float:
    """Poll ``url`` until it answers 200; the seconds from now. Raises RuntimeError, the process killed,
    when it exits first or is not ready within ``timeout_s``."""
    began = time.perf_counter()
    while http_get(url, timeout=1.0)[0] != 200:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready")
        if time.perf_counter() - began > timeout_s:
            process.kill()
            process.wait()
            raise RuntimeError(f"{name} was not ready within {timeout_s:g} s")
        time.sleep(0.01)
    return time.perf_counter() - began


def metric_samples(url: str) -> list[Sample]:
    """Every sample of the server's ``/metrics`` at ``url`` (the server's base URL); none when it has none."""
    status, body = http_get(url + "/metrics")
    if status != 200:
        return []
    return [sample for family in text_string_to_metric_families(body.decode()) for sample in family.samples]


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample of the server's /metrics, matched by name and all its labels (0 when absent)."""
    for sample in metric_samples(url):
        if sample.name == name and sample.labels == labels:
            return float(sample.value)
    return 0.0


@dataclass
class Server:
    """A server process pinned to the server cores."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    process: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> float:
        """Start it and wait until ``ready_path`` answers 200; returns the seconds that took."""
        self.process = subprocess.Popen(
            self.argv, env=os.environ | self.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            self.startup_s = wait_ready(self.process, self.url + self.ready_path, timeout_s, self.name)
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {self._stderr()}") from None
        return self.startup_s

    def _stderr(self) -> str:
        assert self.process is not None and self.process.stderr is not None
        return self.process.stderr.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_mb(self) -> float:
        import psutil

        return round(float(psutil.Process(self.pid).memory_info().rss) / 2**20, 1)

    def tree_rss_mb(self) -> list[float]:
        """The resident memory of the process and of each child (worker processes), in MB."""
        import psutil

        process = psutil.Process(self.pid)
        return [round(float(p.memory_info().rss) / 2**20, 1) for p in [process, *process.children(recursive=True)]]


@contextmanager
def running(server: Server) -> Any:
    server.start()
    try:
        yield server
    finally:
        server.stop()
