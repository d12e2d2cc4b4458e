"""The CPU image, built with podman and run for real: as its users run it, stopped under load, and in
the compose stack through podman-compose: its cpu profile with Prometheus, and its fleet profile (three
replicas behind the HAProxy image) through docker/rolling-restart.sh under load.

The image is built by ``docker/build-image.sh`` (what ``make image`` runs) with an empty /models,
and runs with ``--network host`` on a free loopback port, the tests' repository mounted read-only,
as its non-root user with a read-only root filesystem. The build is cached between runs: after a
code change only the layers from the code on are rebuilt.

Skipped with one line only where podman cannot be installed or run here (the reason is shown).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from bench.fleet import haproxy_states, measure
from bench.loadgen.driver import clock
from service.compiled import MODULES
from service.runtime import Runtime
from tests.bench.test_fleet import assert_nothing_lost
from tests.service.conftest import affine_expected, free_port, infer_json, metric

pytestmark = pytest.mark.slow  # image builds and containers: make test runs them, make test-fast leaves them out

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "docker" / "build-image.sh"
TAG = "localhost/normserve:test"
HAPROXY_TAG = "localhost/normserve-haproxy:test"
CNN = "tiny-cnn-bn"
GRACE_S = 40  # the documented stop grace, above NORMSERVE_SHUTDOWN_TIMEOUT_S (30)
REQUESTS = 7


def podman_env() -> dict[str, str]:
    """The environment the build script gives podman (its engine settings and storage), and the Python
    it should download wheels with."""
    out = subprocess.run(["bash", str(BUILD), "env"], capture_output=True, text=True, check=True).stdout
    env = dict(os.environ, PYTHON=sys.executable)
    for line in out.splitlines():  # export KEY=VALUE, shell-quoted
        key, _, value = shlex.split(line)[1].partition("=")
        env[key] = value
    return env


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=ENV, check=check, timeout=timeout)


ENV: dict[str, str] = {}


@pytest.fixture(scope="module")
def image() -> str:
    """The CPU image with no models of its own, built (or found in the cache) by the build script."""
    ENV.update(podman_env())
    build = subprocess.run(
        ["bash", str(BUILD), "cpu", TAG, "-"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=1200
    )
    if build.returncode == 3:  # the script's word for "podman cannot be installed here"
        pytest.skip(f"podman cannot be installed or run here: {build.stderr.strip()}")
    assert build.returncode == 0, f"the image build failed:\n{build.stdout}\n{build.stderr}"
    return TAG


@pytest.fixture(scope="module")
def readable_repository(built_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' repository, readable by the image's user (pytest's folders are private to root)."""
    root = tmp_path_factory.mktemp("mounted") / "repository"
    shutil.copytree(built_repository, root)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


@dataclass
class Container:
    name: str
    url: str
    port: int
    grpc_port: int = 0  # 0: gRPC off

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr


def start(image: str, repository: Path, **env: str) -> Container:
    port = free_port()
    name = f"normserve-test-{uuid.uuid4().hex[:8]}"
    settings = {"NORMSERVE_HOST": "127.0.0.1", "NORMSERVE_PORT": str(port), "NORMSERVE_GRPC_PORT": "0", **env}
    podman(
        # --read-only-tmpfs=false: no writable /tmp either, as docker --read-only and Kubernetes' readOnlyRootFilesystem
        "run", "--detach", "--name", name, "--network", "host", "--read-only", "--read-only-tmpfs=false",
        "--volume", f"{repository}:/models:ro",
        *(a for k, v in settings.items() for a in ("--env", f"{k}={v}")),
        image,
    )  # fmt: skip
    container = Container(name, f"http://127.0.0.1:{port}", port, int(settings["NORMSERVE_GRPC_PORT"]))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{container.url}/v2/health/ready", timeout=2).status_code == 200:
                return container
        except httpx.HTTPError:
            pass
        if podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() != "true":
            break
        time.sleep(0.25)
    logs = container.logs()
    podman("rm", "--force", name, check=False)
    raise AssertionError(f"the container did not turn ready:\n{logs}")


@pytest.fixture(scope="module")
def container(image: str, readable_repository: Path) -> Iterator[Container]:
    running = start(image, readable_repository, NORMSERVE_GRPC_PORT=str(free_port()))
    try:
        yield running
    finally:
        podman("rm", "--force", "--time", "0", running.name, check=False)


def test_it_runs_as_its_own_user_on_a_read_only_root_and_passes_its_healthcheck(container: Container) -> None:
    assert podman("exec", container.name, "id", "-u").stdout.strip() == "10001"
    for path in ("/opt/normserve/written", "/tmp/written", "/models/written"):
        refused = podman("exec", container.name, "touch", path, check=False)
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr, path
    assert podman("healthcheck", "run", container.name).returncode == 0
    config = podman("image", "inspect", "--format", "{{.Config.StopSignal}} {{json .Config.Entrypoint}}", TAG)
    assert config.stdout.strip() == 'SIGTERM ["python","-m","service"]'  # what `make serve` runs


def test_the_image_runs_its_request_path_compiled(container: Container) -> None:
    """Built in the Dockerfile's compiled stage, on the same Python: every module loads, and the log says so."""
    assert "the request path runs compiled (Cython 3.3.1" in container.logs()
    status = json.loads(podman("exec", container.name, "python", "-m", "service.compile", "--status").stdout)
    assert status["from_source"] == {} and status["compiled"] == list(MODULES)
    # the compiler and Cython stayed in the build stage
    assert podman("exec", container.name, "sh", "-c", "command -v gcc cc", check=False).stdout == ""
    assert podman("exec", container.name, "python", "-c", "import Cython", check=False).returncode != 0


def test_the_image_installs_exactly_the_locked_versions_and_no_torch(container: Container) -> None:
    lock = dict(line.split("==") for line in (ROOT / "requirements.lock").read_text().splitlines())
    installed = dict(line.split("==") for line in podman("exec", container.name, "pip", "freeze").stdout.split())
    assert "torch" not in installed and "onnxruntime-gpu" not in installed
    assert installed.pop("onnxruntime") == "1.31.1"  # the cpu extra's pin: the lock is made with the gpu build
    assert {name: version for name, version in installed.items() if lock.get(name) != version} == {}


def test_tritonclient_gets_the_in_process_answers_with_json_binary_and_grpc(
    container: Container, readable_repository: Path
) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{container.port}")
    try:
        assert client.is_server_ready() and client.is_model_ready(CNN)
        x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
        local = Runtime(readable_repository / CNN / "1" / "model.onnx", "cpu", 0).run({"input": x})[0]
        for binary in (False, True):
            tensor = httpclient.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x, binary_data=binary)
            wanted = httpclient.InferRequestedOutput("logits", binary_data=binary)
            result = client.infer(CNN, [tensor], outputs=[wanted])
            np.testing.assert_allclose(result.as_numpy("logits"), local, rtol=1e-5, atol=1e-6)
        rows = np.arange(8, dtype=np.float32).reshape(2, 4)
        affine = client.infer("affine", [httpclient.InferInput("x", [2, 4], "FP32").set_data_from_numpy(rows)])
        np.testing.assert_allclose(affine.as_numpy("y"), affine_expected(rows)[0], rtol=1e-6)
    finally:
        client.close()
    with grpcclient.InferenceServerClient(f"127.0.0.1:{container.grpc_port}") as triton:  # and over gRPC
        assert triton.is_server_ready() and triton.is_model_ready(CNN)
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)
        np.testing.assert_allclose(triton.infer(CNN, [tensor]).as_numpy("logits"), local, rtol=1e-5, atol=1e-6)
    assert metric(container.url, "normserve_request_success_total", model=CNN, version="1", protocol="http") >= 2
    assert metric(container.url, "normserve_request_success_total", model=CNN, version="1", protocol="grpc") == 1
    assert metric(container.url, "normserve_model_provider", model=CNN, version="1", provider="CPUExecutionProvider")


def test_podman_stop_under_load_answers_every_accepted_request_and_exits_within_the_grace(
    image: str, readable_repository: Path
) -> None:
    # A 1.5 s queue delay keeps the requests in the server when the stop comes: 7 rows do not fill
    # affine's batch of 8, so the batch waits out the delay.
    running = start(image, readable_repository, NORMSERVE_MAX_QUEUE_DELAY_MS="1500")
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    try:
        with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
            url = f"{running.url}/v2/models/affine/infer"
            sent = [pool.submit(httpx.post, url, json=infer_json("x", x), timeout=30) for _ in range(REQUESTS)]
            deadline = time.monotonic() + 10
            while metric(running.url, "normserve_pending_requests", model="affine", version="1") < REQUESTS:
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.02)
            stopped = time.monotonic()
            podman("stop", "--time", str(GRACE_S), running.name, timeout=GRACE_S + 30)
            took = time.monotonic() - stopped
            answers = [f.result() for f in sent]
        assert [a.status_code for a in answers] == [200] * REQUESTS, [a.text for a in answers if a.status_code != 200]
        assert all(a.json()["outputs"][0]["data"] == affine_expected(x)[0].ravel().tolist() for a in answers)
        state = podman("inspect", "--format", "{{.State.ExitCode}}", running.name).stdout.strip()
        assert state == "0" and took < GRACE_S, (state, took, running.logs())
    finally:
        podman("rm", "--force", "--time", "0", running.name, check=False)


@pytest.fixture(scope="module")
def prometheus_image(image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Prometheus image made here from Debian's prometheus on the same base (no registry to pull from)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus: `make debian-tools` installs Debian's prometheus")
    context = tmp_path_factory.mktemp("prometheus-image")
    shutil.copy(binary, context / "prometheus")
    (context / "Containerfile").write_text(
        'FROM localhost/normserve-base:bookworm\nCOPY prometheus /bin/prometheus\nENTRYPOINT ["/bin/prometheus"]\n'
    )
    tag = "localhost/normserve-prometheus:test"
    podman("build", "--quiet", "--network", "none", "--pull=never", "--tag", tag, str(context), timeout=300)
    runs = podman("run", "--rm", "--network", "none", tag, "--version", check=False)
    if runs.returncode != 0:  # a host binary linked against a newer libc than the base's
        pytest.skip(f"this host's prometheus does not run on the bookworm base image: {runs.stderr.strip()}")
    return tag


@dataclass
class Compose:
    """The compose files as shipped, copied into a folder of the test's own (where a test may edit one), run
    by podman-compose with the host-network override under a project name of their own."""

    folder: Path
    env: dict[str, str]
    project: str = field(default_factory=lambda: f"normserve-test-{uuid.uuid4().hex[:8]}")

    @classmethod
    def copy(cls, tmp_path: Path, **env: str) -> Compose:
        shutil.copytree(ROOT / "docker", tmp_path / "docker", ignore=shutil.ignore_patterns("wheels", "k8s"))
        return cls(tmp_path / "docker", ENV | env)

    @property
    def command(self) -> list[str]:
        compose = shutil.which("podman-compose", path=str(Path(sys.executable).parent))
        assert compose is not None, "podman-compose is a dev dependency"
        return [compose, "--project-name", self.project, "-f", "compose.yaml", "-f", "compose.host.yaml"]

    def __call__(self, profile: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [*self.command, "--profile", profile, *args]
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=self.folder, timeout=300)


def test_the_compose_file_brings_normserve_and_prometheus_up_in_its_cpu_profile(
    image: str, prometheus_image: str, readable_repository: Path, tmp_path: Path
) -> None:
    port, prometheus_port = free_port(), free_port()
    compose = Compose.copy(
        tmp_path,
        NORMSERVE_IMAGE=image,
        PROMETHEUS_IMAGE=prometheus_image,
        NORMSERVE_MODELS_DIR=str(readable_repository),
        NORMSERVE_PORT=str(port),
        NORMSERVE_GRPC_PORT=str(free_port()),
        PROMETHEUS_PORT=str(prometheus_port),
    )
    # Only the scrape target follows this test's free port.
    host_config = compose.folder / "prometheus" / "prometheus.host.yml"
    host_config.write_text(host_config.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{port}"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return compose("cpu", *args)

    up = run("up", "--detach", "--no-build", "normserve-cpu", "prometheus")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        url, prometheus = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prometheus_port}"
        deadline = time.monotonic() + 90
        scraped: list[object] = []
        while time.monotonic() < deadline and not scraped:
            time.sleep(1)
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code != 200:
                    continue
                httpx.post(f"{url}/v2/models/affine/infer", json=infer_json("x", np.zeros((1, 4))), timeout=5)
                query = {"query": 'normserve_request_success_total{job="normserve", model="affine"} > 0'}
                scraped = httpx.get(f"{prometheus}/api/v1/query", params=query, timeout=5).json()["data"]["result"]
            except httpx.HTTPError:
                continue
        assert scraped, f"Prometheus never scraped normserve's requests:\n{run('logs').stdout[-3000:]}"
        up_query = httpx.get(f"{prometheus}/api/v1/query", params={"query": 'up{job="normserve"}'}).json()
        assert [r["value"][1] for r in up_query["data"]["result"]] == ["1"]
        rules = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules} >= {"NormserveDown", "NormserveModelNotReady", "NormserveCpuFallback"}
    finally:
        run("down", "--volumes", "--timeout", "5")


@pytest.fixture(scope="module")
def haproxy_image(image: str) -> str:
    """The fleet's HAProxy: the Dockerfile's haproxy target, on a base made with Debian's haproxy in it."""
    build = subprocess.run(
        ["bash", str(BUILD), "haproxy", HAPROXY_TAG], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600
    )
    assert build.returncode == 0, f"the HAProxy image build failed:\n{build.stdout}\n{build.stderr}"
    return HAPROXY_TAG


@dataclass
class ComposeFleet:
    """The compose file's fleet as ``bench.fleet.measure`` sees it: HAProxy's port and its stats socket."""

    repository: Path
    port: int
    stats_socket: Path
    events: list[tuple[float, str, str]] = field(default_factory=list)

    def states(self) -> dict[str, str]:
        return haproxy_states(self.stats_socket)


def test_the_compose_fleet_loses_nothing_through_docker_rolling_restart_sh(
    image: str, haproxy_image: str, readable_repository: Path, tmp_path: Path
) -> None:
    """The fleet profile as shipped (three replicas of the image behind the HAProxy image), an open-loop load
    through HAProxy, and the rolling restart script run as its users run it, with podman-compose."""
    stats = tmp_path / "haproxy-stats"
    stats.mkdir()
    stats.chmod(0o777)  # HAProxy's user makes its socket here
    ports = {f"normserve-{i}": free_port() for i in (1, 2, 3)}
    compose = Compose.copy(
        tmp_path,
        NORMSERVE_IMAGE=image,
        HAPROXY_IMAGE=haproxy_image,
        NORMSERVE_MODELS_DIR=str(readable_repository),
        NORMSERVE_PORT=str(free_port()),
        HAPROXY_STATS_DIR=str(stats),
        **{f"NORMSERVE_{i}_PORT": str(ports[f"normserve-{i}"]) for i in (1, 2, 3)},
    )
    fleet = ComposeFleet(readable_repository, int(compose.env["NORMSERVE_PORT"]), stats / "admin.sock")
    up = compose("fleet", "up", "--detach", "--no-build", *ports, "haproxy")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        deadline = time.monotonic() + 120
        while not (fleet.stats_socket.exists() and set(fleet.states().values()) == {"UP"}):
            assert time.monotonic() < deadline, compose("fleet", "logs").stdout[-3000:]
            time.sleep(0.25)

        def restart() -> None:
            """docker/rolling-restart.sh, its steps logged as it prints them; a replica's readiness is watched
            from here (every 50 ms, on its own port) to say when it was ready again."""
            readiness = ReadinessWatch({name: f"http://127.0.0.1:{port}" for name, port in ports.items()})
            readiness.start()
            said = []
            with subprocess.Popen(
                ["bash", str(compose.folder / "rolling-restart.sh")],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=compose.env | {"COMPOSE": " ".join(compose.command)},
            ) as script:
                assert script.stdout is not None
                for line in script.stdout:
                    said.append(line)
                    name, _, step = line.partition(": ")
                    step = {"stopping": "sigterm", "stopped": "stopped"}.get(step.split(";")[0].strip(), "")
                    if step:
                        fleet.events.append((clock(), name, step))
            readiness.stop.set()
            readiness.join()
            assert script.returncode == 0, "".join(said)
            for at, name, step in list(fleet.events):
                if step == "stopped":
                    ready = next((t for t in readiness.ready[name] if t > at), float("inf"))  # inf: never
                    fleet.events.append((ready, name, "ready"))

        result = measure(fleet, "tiny-cnn-bn", rate=100, before_s=2.0, after_s=1.0, restart=restart)
        print(json.dumps(result, indent=1))  # what pytest shows of a failure, and -s of a pass
    finally:
        compose("fleet", "down", "--timeout", "5")
    assert_nothing_lost(result, at_least=1000)


class ReadinessWatch(threading.Thread):
    """Each replica's readiness every 50 ms: the times it answered ready, per replica."""

    def __init__(self, urls: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.urls, self.stop = urls, threading.Event()
        self.ready: dict[str, list[float]] = {name: [] for name in urls}

    def run(self) -> None:
        with httpx.Client(timeout=0.5) as client:
            while not self.stop.is_set():
                for name, url in self.urls.items():
                    try:
                        if client.get(f"{url}/v2/health/ready").status_code == 200:
                            self.ready[name].append(clock())
                    except httpx.HTTPError:
                        pass
                time.sleep(0.05)


def test_the_image_imports_a_users_onnx_file_without_torch(image: str, tmp_path: Path) -> None:
    """`python -m normserve import` runs in the CPU image, which has onnx and onnxruntime but no torch."""
    from examples.onnx_convnet import main as write_convnet
    from repository import load_config, load_version

    work = tmp_path / "work"
    work.mkdir()
    assert write_convnet([str(work / "convnet.onnx"), "--external-data"]) == 0
    for path in work.iterdir():
        path.chmod(0o644)
    work.chmod(0o777)  # the image's user writes the repository here
    argv = ["-m", "normserve", "import", "/work/convnet.onnx", "--name", "convnet", "--repository", "/work/models"]
    done = podman(
        "run", "--rm", "--network", "none", "--read-only", "--volume", f"{work}:/work",
        "--entrypoint", "python", image, *argv, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "convnet version 1 written to /work/models/convnet/1" in done.stdout
    assert "4 folded, 0 folded forward, 1 as affine" in done.stdout
    assert load_version(work / "models" / "convnet", "1").has_batch_stats
    assert load_config(work / "models" / "convnet").max_batch_size == 64
    no_torch = podman(
        "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", "import torch", check=False
    )
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
