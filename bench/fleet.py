"""A fleet of normserve replicas behind HAProxy on loopback, and a rolling restart of every replica under load.

    python -m bench.fleet --replicas 3 --rate 300 --json fleet.json

It starts the replicas (``python -m service``, each on a port of its own), Debian's ``haproxy`` with the
project's own configuration (``docker/haproxy/haproxy.cfg``, the compose file's ``fleet`` profile uses the
same), and an open-loop load through HAProxy (``bench.loadgen``). Then it replaces the replicas one at a
time, as ``docker/rolling-restart.sh`` does with compose: SIGTERM (the replica's readiness turns 503 and it
drains), wait for it to exit, start it again, wait until it is ready and HAProxy has it back, next.
Meanwhile it reads HAProxy's own view of each replica from its stats socket (``show stat``) every 50 ms.

What it reports: requests sent, answered, failed (by reason), p99 before the restart and during it, and
for each replica when HAProxy took it out and put it back against when it stopped and when it was ready.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.loadgen.driver import Load, Target, clock, encode_request
from bench.loadgen.samples import build_requests, read_signature
from bench.loadgen.stats import Window, summarize
from bench.suite.servers import free_port, wait_ready

__all__ = ["CONFIG", "Balanced", "Fleet", "haproxy", "haproxy_states", "main", "measure", "rolling_restart"]

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "docker" / "haproxy" / "haproxy.cfg"
REPLICAS = 3  # the configuration names three servers
BACKEND = "normserve"


def haproxy() -> str | None:
    """Debian's haproxy (``make debian-tools`` installs it), or None."""
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.path.exists(p)), None)


@dataclass
class Replica:
    index: int
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"normserve-{self.index}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Fleet:
    """The replicas and HAProxy, on loopback; ``with Fleet(...) as fleet:`` starts them and stops them."""

    repository: Path
    drain_s: float = 2.0
    settings: dict[str, str] = field(default_factory=dict)
    replicas: list[Replica] = field(default_factory=list)
    port: int = 0
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="normserve-fleet-")))
    balancer: subprocess.Popen[bytes] | None = None
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (clock, replica, what)

    def __enter__(self) -> Fleet:
        binary = haproxy()
        if binary is None:
            raise FileNotFoundError("no haproxy: `make debian-tools` installs Debian's")
        try:
            self._start_all(binary)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_all(self, binary: str) -> None:
        self.replicas = [Replica(i + 1, free_port()) for i in range(REPLICAS)]
        for replica in self.replicas:
            self.start(replica)
        for replica in self.replicas:
            self.wait_ready(replica)
        self.port = free_port()
        env = os.environ | {
            "HAPROXY_BIND": f"127.0.0.1:{self.port}",
            "HAPROXY_STATS_SOCKET": str(self.stats_socket),
            **{f"NORMSERVE_{r.index}": f"127.0.0.1:{r.port}" for r in self.replicas},
        }
        with open(self.work / "haproxy.log", "wb") as log:  # the process keeps its own copy
            self.balancer = subprocess.Popen([binary, "-db", "-f", str(CONFIG)], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                if set(self.states().values()) == {"UP"}:
                    return
            except OSError:  # its stats socket is not there yet
                pass
            if self.balancer.poll() is not None or time.monotonic() > deadline:
                said = (self.work / "haproxy.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"haproxy did not see every replica up: {said}")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        for process in [r.process for r in self.replicas] + [self.balancer]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [r.process for r in self.replicas] + [self.balancer]:
            if process is not None:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        shutil.rmtree(self.work, ignore_errors=True)

    @property
    def stats_socket(self) -> Path:
        return self.work / "haproxy.sock"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, replica: Replica) -> None:
        env = (
            os.environ
            | {
                "NORMSERVE_REPOSITORY": str(self.repository),
                "NORMSERVE_PORT": str(replica.port),
                "NORMSERVE_GRPC_PORT": "0",
                "NORMSERVE_DRAIN_S": str(self.drain_s),
                "NORMSERVE_LOG_LEVEL": "warning",
                # Behind a load balancer every connection comes from its address: no per-client cap.
                "NORMSERVE_MAX_CONNECTIONS_PER_CLIENT": "0",
            }
            | self.settings
        )
        with open(self.work / f"{replica.name}.log", "ab") as log:  # the process keeps its own copy
            replica.process = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=log, stderr=log)

    def wait_ready(self, replica: Replica) -> None:
        assert replica.process is not None
        wait_ready(replica.process, f"{replica.url}/v2/health/ready", 120, replica.name)

    def states(self) -> dict[str, str]:
        return haproxy_states(self.stats_socket)


def haproxy_states(stats_socket: Path) -> dict[str, str]:
    """HAProxy's status of each replica (``UP``, ``DOWN``, ``UP 1/2`` while a change is confirmed...), from
    ``show stat`` on its stats socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    return {
        row["svname"]: row["status"]
        for row in rows
        if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")
    }


class Balanced(Protocol):
    """What ``measure`` needs of a fleet: its models, HAProxy's port and view, and a log of restart steps
    (``sigterm``, ``stopped``, ``ready`` per replica) that its restart appends to."""

    repository: Path
    port: int
    events: list[tuple[float, str, str]]

    def states(self) -> dict[str, str]: ...


def rolling_restart(fleet: Fleet, timeout_s: float = 120) -> None:
    """Replace every replica, one at a time: SIGTERM, wait for its exit, start it, wait until it is ready and
    HAProxy has it back. Each step goes into ``fleet.events``."""
    for replica in fleet.replicas:
        assert replica.process is not None
        fleet.events.append((clock(), replica.name, "sigterm"))
        replica.process.send_signal(signal.SIGTERM)
        replica.process.wait(timeout=timeout_s)
        fleet.events.append((clock(), replica.name, "stopped"))
        fleet.start(replica)
        fleet.wait_ready(replica)
        fleet.events.append((clock(), replica.name, "ready"))
        deadline = time.monotonic() + timeout_s
        while fleet.states().get(replica.name) != "UP":
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not put {replica.name} back")
            time.sleep(0.05)


class Watcher(threading.Thread):
    """HAProxy's status of each replica every 50 ms: its changes, with the time."""

    def __init__(self, fleet: Balanced) -> None:
        super().__init__(daemon=True)
        self.fleet, self.stop = fleet, threading.Event()
        self.changes: list[tuple[float, str, str]] = []

    def run(self) -> None:
        last: dict[str, str] = {}
        while not self.stop.is_set():
            for name, status in self.fleet.states().items():
                if last.get(name) != status:
                    self.changes.append((clock(), name, status))
                    last[name] = status
            time.sleep(0.05)


class OpenLoad(threading.Thread):
    """An open-loop load through HAProxy at ``rate`` a second, in windows of a second, until ``stop``."""

    def __init__(self, target: Target, requests: list[bytes], rate: float) -> None:
        super().__init__(daemon=True)
        self.target, self.requests, self.rate = target, requests, rate
        self.stop = threading.Event()
        self.windows: list[Window] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # noqa: BLE001  # reported by the caller
            self.error = e

    async def _run(self) -> None:
        load = Load(self.target, self.requests, rate=self.rate, connections=32, timeout_s=10)
        await load.connect()
        load.measure()
        load.start()
        while not self.stop.is_set():
            await asyncio.sleep(1.0)
            self.windows.append(load.swap())
        load.stop()
        if not await load.drain(10):
            load.window.fail("unanswered", "no answer 10 s after the load ended", count=load.outstanding)
        self.windows.append(load.swap())
        load.close()


def _summary(windows: list[Window]) -> dict[str, Any]:
    return summarize(windows) if windows else {}


def measure(
    fleet: Balanced,
    model: str,
    rate: float,
    before_s: float = 3.0,
    after_s: float = 2.0,
    restart: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The load through a rolling restart of every replica: what it sent, what came back, and HAProxy's view.
    ``restart`` replaces the replicas (by default ``rolling_restart`` of a ``Fleet``), logging its steps
    in ``fleet.events``."""
    signature = read_signature(fleet.repository / model / "config.json")
    target = Target("127.0.0.1", fleet.port, f"/v2/models/{model}/infer")
    requests = [encode_request(target, body, headers) for body, headers in build_requests(signature, "json")]
    load = OpenLoad(target, requests, rate)
    watcher = Watcher(fleet)
    watcher.start()
    load.start()
    time.sleep(before_s)
    began = clock()
    if restart is not None:
        restart()
    else:
        assert isinstance(fleet, Fleet)
        rolling_restart(fleet)
    ended = clock()
    time.sleep(after_s)
    load.stop.set()
    load.join(timeout=60)
    watcher.stop.set()
    watcher.join(timeout=10)
    if load.error is not None:
        raise load.error
    before = [w for w in load.windows if w.end <= began]
    during = [w for w in load.windows if w.start < ended and w.end > began]
    errors: dict[str, int] = {}
    for window in load.windows:
        for reason, count in window.errors.items():
            errors[reason] = errors.get(reason, 0) + count
    answered = sum(w.ok for w in load.windows)
    return {
        "replicas": len(fleet.states()),
        "rate": rate,
        "model": model,
        "restart_s": round(ended - began, 2),
        "sent": answered + sum(errors.values()),
        "answered": answered,
        "errors": errors,
        "error_samples": {k: v for w in load.windows for k, v in w.error_samples.items()},
        "before": _summary(before),
        "during": _summary(during),
        "replica_events": _replica_events(fleet.events, watcher.changes, began),
    }


def _replica_events(
    steps: list[tuple[float, str, str]], changes: list[tuple[float, str, str]], began: float
) -> dict[str, dict[str, Any]]:
    """Per replica, seconds from the restart's start: when it got SIGTERM, when HAProxy took it out (DOWN),
    when it stopped, when it was ready again, when HAProxy put it back (UP after the restart)."""
    out: dict[str, dict[str, Any]] = {}
    for at, name, what in steps:
        out.setdefault(name, {})[what] = round(at - began, 3)
    for name, events in out.items():
        sigterm = began + events["sigterm"]
        down = [at for at, n, status in changes if n == name and status.startswith("DOWN") and at >= sigterm]
        events["out"] = round(down[0] - began, 3) if down else None
        ready = began + events.get("ready", float("inf"))
        up = [at for at, n, status in changes if n == name and status == "UP" and at >= ready - 0.5]
        events["back"] = round(up[0] - began, 3) if up else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="cnn-bn")
    parser.add_argument("--rate", type=float, default=300.0, help="requests a second, open loop")
    parser.add_argument("--drain-s", type=float, default=5.0, help="each replica's NORMSERVE_DRAIN_S")
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args(argv)
    with Fleet(args.repository, drain_s=args.drain_s) as fleet:
        result = measure(fleet, args.model, args.rate)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
