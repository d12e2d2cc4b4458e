"""``NORMSERVE_WORKERS``: several worker processes on the same ports, one server to the outside.

Real processes (``python -m service``), real sockets: connections land where the kernel puts them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient

from bench.suite.servers import free_port, metric_samples
from service.config import Settings
from service.errors import NotReady
from service.metrics import Metrics
from service.peers import Peers, sum_statistics
from service.registry import Registry
from service.routes.repository_api import load_model
from service.state import ServiceState
from service.workers import ReadinessBoard, Worker, served_models, worker_count, worker_threads
from tests.service.conftest import KeepAliveLoad, affine_expected, infer_json, metric, start_service

X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture
def two_workers(built_repository: Path) -> Iterator[tuple[psutil.Process, str, int]]:
    """A supervisor of two workers, model control explicit; its process, URL and gRPC port."""
    grpc_port = free_port()
    process, url = start_service(
        built_repository,
        NORMSERVE_WORKERS="2",
        NORMSERVE_GRPC_PORT=str(grpc_port),
        NORMSERVE_MODEL_CONTROL="explicit",
        NORMSERVE_DRAIN_S="0",
    )
    try:
        yield psutil.Process(process.pid), url, grpc_port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


def workers(supervisor: psutil.Process) -> list[psutil.Process]:
    return supervisor.children()


def test_connections_spread_over_the_workers_and_every_worker_gives_the_same_answer(
    two_workers: tuple[psutil.Process, str, int],
) -> None:
    supervisor, url, grpc_port = two_workers
    pids = {w.pid for w in workers(supervisor)}
    assert len(pids) == 2
    clients = [httpx.Client(timeout=10) for _ in range(32)]  # held open: each stays on its worker
    try:
        answers = [c.post(f"{url}/v2/models/affine/infer", json=infer_json("x", X)).json() for c in clients]
        port = int(url.rsplit(":", 1)[1])
        holding = {
            w.pid
            for w in workers(supervisor)
            for c in w.net_connections("tcp")
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
        }
        assert holding == pids  # 32 connections all on one worker: one chance in 2**31
    finally:
        for client in clients:
            client.close()
    y, total = affine_expected(X)
    for answer in answers:
        assert answer["outputs"][0]["data"] == answers[0]["outputs"][0]["data"]
        np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(2, 3), y, rtol=1e-6)
    # gRPC shares the port the same way
    grpc_answers = []
    for _ in range(8):
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            x = grpcclient.InferInput("x", [2, 4], "FP32").set_data_from_numpy(X)
            grpc_answers.append(client.infer("affine", [x]).as_numpy("y"))
    for got in grpc_answers:
        np.testing.assert_allclose(got, y, rtol=1e-6)


def test_metrics_and_statistics_count_every_worker_as_one_server(
    two_workers: tuple[psutil.Process, str, int],
) -> None:
    _, url, _ = two_workers
    for _ in range(20):  # each over a new connection: both workers serve some
        httpx.post(f"{url}/v2/models/affine/infer", json=infer_json("x", X), timeout=10).raise_for_status()
    # whichever worker answers the scrape counts all 20 (and their 40 rows)
    for _ in range(4):
        assert metric(url, "normserve_request_success_total", model="affine", version="1", protocol="http") == 20
        assert metric(url, "normserve_inference_count_total", model="affine", version="1") == 40
        assert metric(url, "normserve_model_ready", model="affine", version="1") == 1
        stats = httpx.get(f"{url}/v2/models/affine/stats", timeout=10).json()["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] == 20 and stats["inference_count"] == 40
        # and each worker's own share, to see how the kernel spread them (20 connections: both served some)
        shares = [metric(url, "normserve_worker_inference_count_total", worker=str(w)) for w in (0, 1)]
        assert sum(shares) == 40 and min(shares) > 0


def test_load_and_unload_reach_every_worker_and_readiness_speaks_for_all(
    two_workers: tuple[psutil.Process, str, int],
) -> None:
    _, url, _ = two_workers
    unloaded = httpx.post(f"{url}/v2/repository/models/affine/unload", timeout=60)
    assert unloaded.status_code == 200, unloaded.text
    for _ in range(12):  # every worker: gone, over any new connection
        assert httpx.get(f"{url}/v2/models/affine/ready", timeout=10).status_code == 404
        assert not [
            s for s in metric_samples(url) if s.name == "normserve_model_ready" and s.labels["model"] == "affine"
        ]
    loaded = httpx.post(f"{url}/v2/repository/models/affine/load", timeout=120)
    assert loaded.status_code == 200, loaded.text
    for _ in range(12):
        assert httpx.get(f"{url}/v2/models/affine/ready", timeout=10).status_code == 200
    # a model that fails to load fails on every worker, and the error says so
    missing = httpx.post(f"{url}/v2/repository/models/no-such-model/load", timeout=60)
    assert missing.status_code == 404
    ready = httpx.get(f"{url}/v2/health/ready", timeout=10)
    assert ready.status_code == 200


def test_a_worker_that_stops_answering_makes_the_server_not_ready(
    two_workers: tuple[psutil.Process, str, int],
) -> None:
    supervisor, url, _ = two_workers
    stopped = workers(supervisor)[0]
    stopped.suspend()  # SIGSTOP: its heartbeat stops
    try:
        deadline = time.monotonic() + 15
        while True:
            try:  # a new connection may land on the stopped worker: another one will not
                ready = httpx.get(f"{url}/v2/health/ready", timeout=1)
            except httpx.TimeoutException:
                continue
            if ready.status_code == 503:
                break
            assert time.monotonic() < deadline, "still ready with a worker stopped"
            time.sleep(0.2)
        assert "of 2 is not ready" in ready.json()["error"]
    finally:
        stopped.resume()
    deadline = time.monotonic() + 15
    while httpx.get(f"{url}/v2/health/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "not ready again after the worker resumed"
        time.sleep(0.2)


def test_a_killed_worker_is_restarted_with_its_models_and_the_counts_go_on(
    two_workers: tuple[psutil.Process, str, int],
) -> None:
    supervisor, url, _ = two_workers
    # what the workers serve changes first: the restarted one must load the same (affine unloaded)
    assert httpx.post(f"{url}/v2/repository/models/affine/unload", timeout=60).status_code == 200
    outcomes: list[int | str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:  # a new connection each time: some land on the worker killed
                r = httpx.post(f"{url}/v2/models/tiny-cnn-bn/infer", json=infer_json("input", np.zeros((1, 1, 8, 8))))
                outcomes.append(r.status_code)
            except httpx.TransportError as e:
                outcomes.append(type(e).__name__)

    sender = threading.Thread(target=load)
    sender.start()
    time.sleep(0.5)
    killed = workers(supervisor)[0]
    before = metric(url, "normserve_request_success_total", model="tiny-cnn-bn", version="1", protocol="http") or 0
    killed.kill()
    deadline = time.monotonic() + 60
    while len({w.pid for w in workers(supervisor)} - {killed.pid}) < 2:
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.2)
    while httpx.get(f"{url}/v2/health/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "not ready again after the restart"
        time.sleep(0.2)
    time.sleep(0.5)
    stop.set()
    sender.join(timeout=30)
    answered = [o for o in outcomes if isinstance(o, int)]
    assert answered and set(answered) == {200}, sorted(set(map(str, outcomes)))
    # the counts of the killed worker stay; the restarted one serves what the others do
    after = metric(url, "normserve_request_success_total", model="tiny-cnn-bn", version="1", protocol="http")
    assert after is not None and after >= before + len(answered) // 2
    for _ in range(8):
        assert httpx.get(f"{url}/v2/models/affine/ready", timeout=10).status_code == 404


def test_sigterm_with_two_workers_drains_both_and_loses_no_request_they_accepted(built_repository: Path) -> None:
    """As one server drains (tests/service/test_main.py): the supervisor passes SIGTERM on, readiness turns
    503 on both workers at once, every request is still answered through the drain (with Connection: close),
    then both listeners close and the supervisor exits 0."""
    process, url = start_service(built_repository, NORMSERVE_WORKERS="2", NORMSERVE_DRAIN_S="2")
    with KeepAliveLoad(url, X) as load:
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        for _ in range(6):  # over new connections, whichever worker takes each: both drain
            ready = httpx.get(f"{url}/v2/health/ready", timeout=5)
            assert ready.status_code == 503 and "draining" in ready.json()["error"]
        time.sleep(1.0)  # the load runs on into the drain, as clients that have not yet seen readiness do
    outcomes = load.outcomes
    _, log = process.communicate(timeout=60)
    assert process.returncode == 0, log
    assert not [o for o in outcomes if o.startswith("lost")], outcomes
    assert "200 close" in outcomes and set(outcomes) <= {"200 keep-alive", "200 close"}
    with pytest.raises(httpx.ConnectError):  # both listeners are closed
        httpx.get(f"{url}/v2/health/live", timeout=2)
    assert log.count("drained: closing the listener") == 2 and "every worker stopped" in log
    assert "Traceback" not in log


# -- the parts alone --


def test_auto_is_one_worker_per_usable_core_and_threads_share_the_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    assert worker_count(Settings(workers="auto")) == cores
    assert worker_count(Settings(workers=3)) == 3
    assert worker_threads(Settings(), 1) == cores
    assert worker_threads(Settings(), cores * 4) == 1  # never 0
    assert worker_threads(Settings(intra_op_threads=64), 1) == cores  # capped at the cores


def test_the_board_says_which_workers_are_not_ready(tmp_path: Path) -> None:
    board = ReadinessBoard(tmp_path / "ready", 3, create=True)
    assert board.not_ready([0, 1, 2]) == [0, 1, 2]  # none has written yet
    board.write(0, True)
    board.write(1, False)
    other = ReadinessBoard(tmp_path / "ready", 3)  # another process's view of the same file
    assert other.not_ready([0, 1, 2]) == [1, 2]
    board.clear(0)
    assert other.not_ready([0]) == [0]


def test_statistics_add_up_over_workers() -> None:
    def entry(success: int, rows: int, last: int, sizes: dict[int, int]) -> dict[str, object]:
        duration = {"count": success, "ns": success * 10}
        return {
            "name": "m",
            "version": "1",
            "last_inference": last,
            "inference_count": rows,
            "execution_count": sum(sizes.values()),
            "inference_stats": {k: dict(duration) for k in ("success", "fail", "queue", "compute_infer")},
            "batch_stats": [
                {
                    "batch_size": b,
                    **{k: {"count": n, "ns": n} for k in ("compute_input", "compute_infer", "compute_output")},
                }
                for b, n in sizes.items()
            ],
        }

    mine = [entry(3, 5, 100, {1: 1, 2: 2})]
    summed = sum_statistics(mine, [[entry(4, 4, 250, {1: 4})], []])[0]
    assert summed["inference_count"] == 9 and summed["execution_count"] == 7 and summed["last_inference"] == 250
    assert summed["inference_stats"]["success"] == {"count": 7, "ns": 70}
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in summed["batch_stats"]] == [(1, 5), (2, 2)]


def test_a_model_every_worker_fails_to_load_fails_as_on_one_server(repository: Path) -> None:
    broken = repository / "broken"
    shutil.copytree(repository / "affine", broken)
    (broken / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    process, url = start_service(
        repository, NORMSERVE_WORKERS="2", NORMSERVE_MODEL_CONTROL="explicit", NORMSERVE_GRPC_PORT="0"
    )
    try:
        (broken / "1" / "model.onnx").write_bytes(b"still not an onnx graph")
        answer = httpx.post(f"{url}/v2/repository/models/broken/load", timeout=60)
        assert answer.status_code == 503 and answer.json()["error"].startswith("model 'broken' failed to load: ")
        for _ in range(8):  # every worker shows it as one server does: in the index, unavailable, and why
            index = httpx.post(f"{url}/v2/repository/index", timeout=10).json()
            (row,) = [r for r in index if r["name"] == "broken"]
            assert row["state"] == "UNAVAILABLE" and row["reason"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


class _Peer(Peers):
    """Worker 1 of 2, answering as ``answers`` says, and the calls it was sent."""

    def __init__(self, worker: Worker, answers: dict[str, tuple[int, dict[str, str]]]) -> None:
        super().__init__(worker)
        self.answers, self.calls = answers, []

    async def request(self, index: int, method: str, path: str, timeout_s: float) -> tuple[int, object]:
        action = path.rsplit("/", 1)[1]
        self.calls.append(action)
        return self.answers.get(action, (200, {}))


@pytest.mark.anyio
async def test_a_load_one_worker_fails_changes_no_worker(built_repository: Path, tmp_path: Path) -> None:
    settings = Settings(repository=built_repository, provider="cpu", model_control="explicit")
    metrics = Metrics()
    state = ServiceState(settings, metrics, Registry(settings, metrics))
    state.worker = Worker(0, 2, tmp_path)
    peer = state.peers = _Peer(state.worker, {"prepare": (503, {"error": "out of memory"})})
    with pytest.raises(NotReady) as refused:
        await load_model(state, "affine", "test")
    assert refused.value.message == (
        "model 'affine' failed to load on 1 of 2 workers (worker 1 of 2: out of memory); "
        "no worker changed what it serves"
    )
    assert "affine" not in state.registry.models and peer.calls == ["prepare", "abort"]
    assert served_models(tmp_path) is None  # nothing to tell a restarted worker
    # when every worker builds it, every worker swaps it in, and a restarted one will load it too
    peer.answers = {}
    entry = await load_model(state, "affine", "test")
    assert entry.latest_ready() is not None and state.registry.models["affine"] is entry
    assert peer.calls[2:] == ["prepare", "commit"] and served_models(tmp_path) == ["affine"]
    await state.registry.close()


def test_workers_that_cannot_start_stop_the_server_instead_of_restarting_forever(built_repository: Path) -> None:
    with socket.socket() as taken:  # another program's port, without SO_REUSEPORT: no worker can share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = os.environ | {
            "NORMSERVE_REPOSITORY": str(built_repository),
            "NORMSERVE_PORT": str(port),
            "NORMSERVE_GRPC_PORT": "0",
            "NORMSERVE_WORKERS": "2",
        }
        done = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"could not bind 127.0.0.1:{port}" in done.stderr and "before it served; stopping" in done.stderr
    assert "Traceback" not in done.stderr  # said plainly, once per worker
