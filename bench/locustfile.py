"""Load-test a normserve model with locust, sending real held-out digits.

Each simulated user sends inference requests to ``/v2/models/<model>/infer``, one after another
and as fast as the server answers (no wait between requests unless ``NORMSERVE_LOCUST_WAIT_S`` sets
one). The bodies are built once, at start, from the held-out test digits of ``models.data``: 64
requests of one row each, which every user cycles through. For a model whose input is larger than
the 8x8 digits (``resnet18-bn`` takes [3, 224, 224]) each digit is scaled up by nearest neighbour
and repeated across the channels. The input's name, datatype and shape come from the model's
metadata (``GET /v2/models/<model>``), read once per process when the first user starts; only a
single FP32 input of shape [-1, C, H, W] is supported. Large inputs get fewer distinct bodies, as
many as fit in 8 MiB.

Run it from the repository root in the project's environment (where ``models`` imports), against
a running server (``make serve``):

    # headless: 64 users, all started at once, for 60 s
    locust -f bench/locustfile.py --host http://127.0.0.1:8000 --headless -u 64 -r 64 -t 60s

    # Triton's binary tensor data instead of JSON, statistics to bench-out_stats.csv and friends
    NORMSERVE_LOCUST_DATA=binary locust -f bench/locustfile.py --host http://127.0.0.1:8000 \\
        --headless -u 64 -r 64 -t 60s --csv bench-out

    # the web UI on http://127.0.0.1:8089, where the users, spawn rate and host are set per run
    NORMSERVE_LOCUST_MODEL=resnet18-bn locust -f bench/locustfile.py --host http://127.0.0.1:8000

Environment variables, read when the first user starts:

    NORMSERVE_LOCUST_MODEL   the model to drive (default ``cnn-bn``)
    NORMSERVE_LOCUST_DATA    ``json`` (tensors as JSON numbers, the default) or ``binary`` (Triton's
                             binary data extension: a JSON header of ``Inference-Header-Content-Length``
                             bytes, then the raw little-endian floats; outputs come back as bytes too)
    NORMSERVE_LOCUST_WAIT_S  seconds each user waits between requests (default 0)

(``NORMSERVE_LOCUST_*``, apart from the service's own ``NORMSERVE_*`` settings.)

Requests appear in locust's statistics as ``/v2/models/<model>/infer [json]`` (or ``[binary]``).
A response other than 200 is a failure named by its status and the start of the server's
``{"error": ...}``; an unknown model, an unreachable host or an unsupported input stops the run at
start with a message saying which, and a headless run exits 1.

What the figures mean: locust measures closed-loop latency, from when a user sends a request to
when its answer has been read, and each user sends its next request only then; so under overload
the request rate falls instead of latency growing without bound (coordinated omission), and the
time a user waits for its turn on locust's own CPU counts as server latency. Locust is also Python,
gevent and one CPU core per process: at a few thousand requests per second it is the bottleneck
(it warns when its CPU passes 90%), well before normserve is. It suits functional load, soak tests
and teams whose tooling is locust; for figures to quote, use the project's own load generator,
``python -m bench.loadgen``.
"""

from __future__ import annotations

import itertools
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cache
from typing import Any

import gevent
from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.exception import StopTest

from bench.loadgen.samples import ModelSignature, build_requests

__all__ = ["NormserveUser", "LoadTestSettings", "Workload", "fetch_metadata", "load_workload"]

BODIES = 64  # distinct requests built at start, cycled through by every user...
BODY_BYTES = 8 << 20  # ...or as many as fit in 8 MiB (a 224x224 RGB image is 0.6 MB binary, 0.9 MB as JSON)
METADATA_TIMEOUT_S = 10.0
ERROR_CHARS = 200  # how much of an error body a failure keeps (locust groups failures by message)


class SetupError(Exception):
    """The load test cannot start: a bad setting, an unknown model, an unsupported input."""


@dataclass(frozen=True)
class LoadTestSettings:
    """The load test's settings, from NORMSERVE_LOCUST_MODEL, NORMSERVE_LOCUST_DATA and NORMSERVE_LOCUST_WAIT_S."""

    model: str
    data: str  # "json" or "binary"
    wait_s: float

    @classmethod
    def from_env(cls) -> LoadTestSettings:
        model = os.environ.get("NORMSERVE_LOCUST_MODEL", "cnn-bn")
        data = os.environ.get("NORMSERVE_LOCUST_DATA", "json").strip().lower()
        if data not in ("json", "binary"):
            raise SetupError(f"NORMSERVE_LOCUST_DATA is {data!r}; expected 'json' or 'binary'")
        wait = os.environ.get("NORMSERVE_LOCUST_WAIT_S", "0")
        try:
            wait_s = float(wait)
        except ValueError:
            wait_s = -1.0
        if not wait_s >= 0:  # also refuses NaN
            raise SetupError(f"NORMSERVE_LOCUST_WAIT_S is {wait!r}; expected seconds, 0 or more")
        return cls(model=model, data=data, wait_s=wait_s)


@dataclass(frozen=True)
class Workload:
    """What every user sends: the path, its name in locust's statistics, the headers and bodies."""

    path: str
    name: str
    headers: dict[str, str]
    bodies: list[bytes]


def fetch_metadata(host: str, model: str) -> dict[str, Any]:
    """The model's metadata from ``GET /v2/models/<model>``, or SetupError saying why not."""
    url = f"{host.rstrip('/')}/v2/models/{model}"
    try:
        with urllib.request.urlopen(url, timeout=METADATA_TIMEOUT_S) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace")
        raise SetupError(f"GET {url} answered {e.code}: {_error_text(body)}") from None
    except OSError as e:  # URLError included: refused, unresolvable, timed out
        raise SetupError(f"cannot read the metadata of model {model!r} from {url}: {e}") from None
    except ValueError as e:
        raise SetupError(f"GET {url} answered something other than JSON ({e}); is {host} a normserve server?") from None


def load_workload(host: str, settings: LoadTestSettings) -> Workload:
    """Read the model's input from the server and build the requests from the held-out digits
    (the load generator's own request builder, so both tools send the same bytes)."""
    metadata = fetch_metadata(host, settings.model)
    try:
        signature = ModelSignature.from_metadata(metadata)
    except (ValueError, KeyError) as e:
        raise SetupError(f"model {settings.model!r}: {e}") from None
    if signature.input.datatype != "FP32":
        raise SetupError(f"input {signature.input.name!r} is {signature.input.datatype}; this locustfile sends FP32")
    one = len(build_requests(signature, settings.data, distinct=1)[0][0])
    requests = build_requests(signature, settings.data, distinct=max(1, min(BODIES, BODY_BYTES // one)))
    path = f"/v2/models/{settings.model}/infer"
    return Workload(path, f"{path} [{settings.data}]", requests[0][1], [body for body, _ in requests])


def _error_text(body: str) -> str:
    """The ``error`` of a ``{"error": ...}`` body, else the body, cut to ERROR_CHARS."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        error = body
    text = str(error)
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + "..."


@cache
def _workload(host: str, settings: LoadTestSettings) -> Workload:
    return load_workload(host, settings)  # once per process (and host, which the web UI can change)


@events.init.add_listener
def _refresh_clock(**_: Any) -> None:
    """Bring gevent's clock up to date before locust sets its ``-t`` timer.

    gevent reads the time once per turn of its loop, and the loop has not turned since locust
    started: without this, the second or so spent importing this file (scikit-learn) would be cut
    from the run.
    """
    gevent.get_hub().loop.update_now()


class NormserveUser(FastHttpUser):
    """Sends inference requests back to back, cycling through the prepared bodies."""

    _users = itertools.count()

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        try:
            self.settings = LoadTestSettings.from_env()
            self.workload = _workload(self.host, self.settings)
        except SetupError as e:
            # StopTest in a user's constructor is how locust itself refuses a missing --host: it logs the
            # message and stops the run. The exit code is ours to set.
            if environment.parsed_options is not None and environment.parsed_options.headless:
                environment.process_exit_code = 1
            raise StopTest(f"normserve locustfile: {e}") from None
        start = next(self._users) % len(self.workload.bodies)  # users start at different bodies
        self.bodies = itertools.cycle(self.workload.bodies[start:] + self.workload.bodies[:start])

    def wait_time(self) -> float:
        return self.settings.wait_s

    @task
    def infer(self) -> None:
        w = self.workload
        with self.client.post(
            w.path, data=next(self.bodies), headers=w.headers, name=w.name, catch_response=True
        ) as response:
            # Status 0 is no response at all: locust reports the connection error itself.
            if response.status_code not in (0, 200):
                response.failure(f"HTTP {response.status_code}: {_error_text(response.text or '')}")
