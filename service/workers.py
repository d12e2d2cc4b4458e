"""Worker processes: ``NORMSERVE_WORKERS=N`` (or ``auto``, one per usable core) whole servers on the same ports.

The process ``python -m service`` starts becomes a supervisor: it serves nothing itself, and starts N
workers (``python -m service --worker I --run-dir DIR``). Each is the whole server (its own event loop,
onnxruntime sessions, batchers), and listens on the HTTP and gRPC ports with a socket of its own
(``SO_REUSEPORT``): the kernel spreads new connections across the workers, with no proxy in between.
Each also listens on a Unix socket of its own in the supervisor's run folder (0700), which only its peers
use, so that a request that must reach every worker (a model load or unload, the statistics) can.

Outside, the workers are one server:

- a worker opens its ports only once its models are loaded and warm, so a restarted one takes no traffic
  before it can answer it;
- readiness is true only when every worker is ready: each writes its own readiness, with a heartbeat,
  into a shared board (``ReadinessBoard``), and any worker answers for all of them;
- a model load or unload goes to every worker, and answers when all have done it (``service.peers``);
  the models served are written to the run folder, and a restarted worker loads those;
- ``/metrics`` reads every worker's counters through prometheus_client's multiprocess mode (a dead
  worker's counts stay), and the statistics extension sums every worker's.

The supervisor restarts a worker that dies (logged, with a back-off if it dies again at once), and on
SIGTERM or Ctrl-C passes the signal to every worker, each of which drains as a single server does, and
exits once they have all stopped. A second signal is passed on too: the workers stop at once.

``SO_REUSEPORT`` spreads connections on Linux; elsewhere (macOS, BSD) the sockets bind but the kernel
may send every connection to one of them, so keep one worker there.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from service.config import Settings
from service.machine import available_cores

__all__ = [
    "ReadinessBoard",
    "Supervisor",
    "Worker",
    "served_models",
    "worker_count",
    "worker_threads",
    "write_served_models",
]

log = logging.getLogger("service.workers")

# A worker's readiness slot: ready (0/1), then the time.monotonic() of its last heartbeat (one clock for
# every process on the host).
_SLOT = struct.Struct("<Bxxxxxxxd")
HEARTBEAT_S = 0.5
# A worker whose heartbeat is older than this is not ready (stopped, or its event loop held).
STALE_S = 3.0
# Restarts: at once the first time, then waiting up to this long while a worker keeps dying at start.
MAX_BACKOFF_S = 10.0
# A worker that ran at least this long before dying was not crash-looping: its back-off starts over.
HEALTHY_RUN_S = 30.0


def worker_count(settings: Settings) -> int:
    return available_cores() if settings.workers == "auto" else settings.workers


def worker_threads(settings: Settings, workers: int) -> int:
    """onnxruntime's intra-op threads per worker, so that workers x threads is at most the usable cores:
    NORMSERVE_INTRA_OP_THREADS if it fits, else the cores' share of each worker (at least 1)."""
    share = max(1, available_cores() // workers)
    if settings.intra_op_threads == 0:
        return share
    if settings.intra_op_threads > share:
        log.warning(
            "NORMSERVE_INTRA_OP_THREADS=%d with %d workers is more than the %d usable cores: %d threads each",
            settings.intra_op_threads,
            workers,
            available_cores(),
            share,
        )
        return share
    return settings.intra_op_threads


def worker_name(index: int, count: int) -> str:
    return f"worker {index} of {count}"


@dataclass(frozen=True)
class Worker:
    """Who this process is, when it is one of several: its index, how many there are, the run folder."""

    index: int
    count: int
    run_dir: Path

    def socket_path(self, index: int | None = None) -> Path:
        return self.run_dir / f"worker-{self.index if index is None else index}.sock"

    @property
    def peers(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]

    def name(self, index: int | None = None) -> str:
        return worker_name(self.index if index is None else index, self.count)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT, not yet listening: uvicorn listens on it once
    the worker's models are warm (a socket that does not listen gets none of the port's connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"could not bind {host}:{port} ({e}): is another server on it?") from None
    sock.set_inheritable(True)
    return sock


def control_socket(path: Path) -> socket.socket:
    """The worker's Unix socket in the run folder, which its peers' fan-out calls reach."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    return sock


class ReadinessBoard:
    """Every worker's readiness and heartbeat, in a small shared file of the run folder (mmap)."""

    def __init__(self, path: Path, count: int, create: bool = False) -> None:
        self.count = count
        if create:
            path.write_bytes(bytes(_SLOT.size * count))
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), _SLOT.size * count)

    def write(self, index: int, ready: bool) -> None:
        _SLOT.pack_into(self._map, index * _SLOT.size, int(ready), time.monotonic())

    def clear(self, index: int) -> None:
        _SLOT.pack_into(self._map, index * _SLOT.size, 0, 0.0)

    def beating(self, index: int) -> bool:
        """The worker has written its slot: its models loaded, its ports open (ready or not)."""
        return bool(_SLOT.unpack_from(self._map, index * _SLOT.size)[1])

    def not_ready(self, indexes: list[int]) -> list[int]:
        """Those of ``indexes`` that are not ready, or whose heartbeat stopped."""
        now = time.monotonic()
        late = []
        for i in indexes:
            ready, beat = _SLOT.unpack_from(self._map, i * _SLOT.size)
            if not ready or now - beat > STALE_S:
                late.append(i)
        return late


def served_models(run_dir: Path) -> list[str] | None:
    """The models the workers serve now, after a load or unload changed them; None before any did."""
    path = run_dir / "models.json"
    try:
        return list(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def write_served_models(run_dir: Path, names: list[str]) -> None:
    path = run_dir / "models.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(sorted(names)))
    temporary.replace(path)  # atomic: a worker starting now reads the old list or the new one


class WorkerFailed(RuntimeError):
    """A worker exited before it ever served."""


class Supervisor:
    """Starts the workers, restarts one that dies, and passes signals on to them."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings, self.count = settings, count
        self.threads = worker_threads(settings, count)
        self.run_dir = Path(tempfile.mkdtemp(prefix="normserve-"))  # 0700: only this user reaches the sockets
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * count
        self.started_at = [0.0] * count
        self.failures = [0] * count
        self.served = [False] * count  # each worker has opened its ports once (its first start succeeded)
        self.stopping = 0  # signals received
        self.board = ReadinessBoard(self.run_dir / "ready", count, create=True)
        (self.run_dir / "metrics").mkdir()

    def _environment(self) -> dict[str, str]:
        return os.environ | {
            "PROMETHEUS_MULTIPROC_DIR": str(self.run_dir / "metrics"),
            "NORMSERVE_INTRA_OP_THREADS": str(self.threads),
        }

    def _start(self, index: int) -> None:
        argv = [sys.executable, "-m", "service", "--worker", str(index), "--of", str(self.count)]
        argv += ["--run-dir", str(self.run_dir)]
        # A process group of its own: Ctrl-C in a terminal reaches the supervisor alone, which passes it on
        # once (a worker that got it twice would stop at once instead of draining).
        self.processes[index] = subprocess.Popen(argv, env=self._environment(), process_group=0)
        self.started_at[index] = time.monotonic()

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        self.stopping += 1
        name = signal.Signals(sig).name
        log.info("%s: passing it on to the %d workers%s", name, self.count, "" if self.stopping == 1 else " (stop now)")
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM if sig == signal.SIGTERM else signal.SIGINT)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        log.info(
            "starting %d workers (%d onnxruntime threads each) on HTTP port %d%s; run folder %s",
            self.count,
            self.threads,
            self.settings.port,
            f" and gRPC port {self.settings.grpc_port}" if self.settings.grpc_port else "",
            self.run_dir,
        )
        code = 0
        try:
            for index in range(self.count):
                self._start(index)
            self._watch()
        except WorkerFailed as e:
            log.error("%s", e)  # the others are stopped below
            code = 1
        finally:
            for process in self.processes:
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("every worker stopped")
        return code

    def _watch(self) -> None:
        restart_at: dict[int, float] = {}
        while True:
            if self.stopping:  # nothing restarts: wait for every worker's drain to end
                if all(p is None or p.poll() is not None for p in self.processes):
                    return
                time.sleep(0.05)
                continue
            for index, process in enumerate(self.processes):
                if process is not None and not self.served[index] and self.board.beating(index):
                    self.served[index] = True
                if process is None or process.poll() is None or index in restart_at:
                    continue
                if not self.served[index]:
                    # It never came up (a port another program holds, a bad setting): so would the next.
                    raise WorkerFailed(
                        f"{worker_name(index, self.count)} exited with status {process.returncode} before it "
                        "served; stopping"
                    )
                self._died(index, process.returncode)
                restart_at[index] = time.monotonic() + self._backoff(index)
            now = time.monotonic()
            for index in [i for i, when in restart_at.items() if now >= when]:
                del restart_at[index]
                log.info("restarting %s", worker_name(index, self.count))
                self._start(index)
            time.sleep(0.05)

    def _died(self, index: int, code: int) -> None:
        process = self.processes[index]
        assert process is not None
        self.board.clear(index)
        self._forget_metrics(process.pid)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
        log.error(
            "%s (pid %d) exited with %s: restarting it, its models loaded before it takes traffic",
            worker_name(index, self.count),
            process.pid,
            how,
        )
        ran = time.monotonic() - self.started_at[index]
        self.failures[index] = 0 if ran >= HEALTHY_RUN_S else self.failures[index] + 1

    def _backoff(self, index: int) -> float:
        failures = self.failures[index]
        return 0.0 if failures <= 1 else min(MAX_BACKOFF_S, 0.5 * math.pow(2, failures - 2))

    def _forget_metrics(self, pid: int) -> None:
        """A dead worker's live gauges (its queue) leave /metrics; its counters stay, as they should."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.run_dir / "metrics"))  # type: ignore[no-untyped-call]
