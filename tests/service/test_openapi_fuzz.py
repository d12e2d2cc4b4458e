"""Schemathesis against a real server: no request makes it fail, and every answer is one its document lists.

``test_app`` checks the shape of the OpenAPI document; this checks that the server keeps to it, which
clients generated from the document and the Swagger UI rely on. A seeded, bounded schemathesis run (its
examples, coverage and fuzzing phases) sends every operation of the served /openapi.json boundary and
generated requests, valid and invalid, over HTTP to a real uvicorn. Each answer must be no 5xx, with a
documented status and content type and a body that matches the documented schema.

Generated bodies almost never fit a model's inputs, so the run mostly meets 400s; a few well-formed
requests, checked the same way, keep the 200 bodies of inference and batchnorm to the document too.
A failure names the operation, the check, the status and a curl command that reproduces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import engine
from schemathesis.engine import Status, StopReason, events
from schemathesis.errors import FailureGroup

from tests.service.conftest import RunningServer

# Path parameters fixed to what the test repository serves: generated names would only ever meet 404.
MODEL = "affine"
BATCHNORM_MODEL = "tiny-cnn-bn"  # affine has no BatchNorm, so its batchnorm answer is always 400
VERSION = "1"

# The checks that a response is true to the document, and no server error. Checks that go beyond the
# document (e.g. that a schema-valid body is accepted) stay off: no schema of an inference body can say
# which shapes a given model takes.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)

# What a schemathesis.toml would hold. No max-time: with one, schemathesis keeps fuzzing until it runs
# out, so the example count is the bound. The stateful phase is off: the document has no links to follow.
CONFIG: dict[str, Any] = {
    "seed": 20260601,
    "workers": 1,
    "request-timeout": 10,
    "generation": {"mode": "all", "max-examples": 50, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
    "parameters": {"model_name": MODEL, "model_version": VERSION},
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
}


@dataclass(frozen=True)
class Found:
    """One failed check, with what it takes to reproduce it."""

    operation: str
    check: str
    status: int | None
    failure: str
    curl: str

    def __str__(self) -> str:
        return f"{self.operation}: {self.check} (HTTP {self.status})\n{self.failure}\nReproduce with:\n{self.curl}"


def load_schema(server: RunningServer) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict({**CONFIG, "base-url": server.url})
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)


def run(schema: schemathesis.BaseSchema) -> tuple[list[Found], list[str], int]:
    """One schemathesis run: its failed checks, its errors (its own, or a check's) and how many requests it sent."""
    failures: dict[Exception, Found] = {}  # the same failure, met by many cases, is reported once
    errors: list[str] = []
    cases = 0
    finished: events.EngineFinished | None = None
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            cases += len(recorder.cases)
            if event.status == Status.ERROR:
                errors.append(f"{recorder.label}: its {event.phase.value} phase errored")
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.failure_info is None:
                        continue
                    failure = check.failure_info.failure
                    response = recorder.interactions[failure.case_id or case_id].response
                    status = response.status_code if response is not None else None
                    found = Found(recorder.label, check.name, status, str(failure), check.failure_info.code_sample)
                    failures.setdefault(failure, found)
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            errors.append(f"schemathesis failed: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            finished = event
            for failure in event.failures:
                failures.setdefault(failure, Found("after the run", failure.title, None, str(failure), ""))
    if finished is None or finished.stop_reason != StopReason.COMPLETED:
        errors.append(f"the run did not complete: {finished.stop_reason if finished else 'no end event'}")
    return list(failures.values()), errors, cases


def well_formed(server: RunningServer, model: str, **extra: Any) -> dict[str, Any]:
    """An inference request that ``model`` accepts, a batch of 2, built from its metadata."""
    inputs = []
    for spec in httpx.get(f"{server.url}/v2/models/{model}").json()["inputs"]:
        shape = [2 if size == -1 else size for size in spec["shape"]]
        data = [0.5] * math.prod(shape)
        inputs.append({"name": spec["name"], "datatype": spec["datatype"], "shape": shape, "data": data})
    return {"id": "fuzz", "inputs": inputs, **extra}


def answers(server: RunningServer, schema: schemathesis.BaseSchema) -> tuple[list[Found], list[str]]:
    """Well-formed inference and batchnorm requests, their answers checked as the run checks its own.

    Returns the failed checks, and the requests that were not answered 200 (whose 200 went unchecked).
    """
    binary = {"parameters": {"binary_data_output": True}}  # answered as application/octet-stream
    calls = [
        ("/v2/models/{model_name}/infer", MODEL, well_formed(server, MODEL)),
        ("/v2/models/{model_name}/infer", MODEL, well_formed(server, MODEL, **binary)),
        ("/v2/models/{model_name}/versions/{model_version}/infer", MODEL, well_formed(server, MODEL)),
        ("/v2/models/{model_name}/batchnorm", BATCHNORM_MODEL, well_formed(server, BATCHNORM_MODEL)),
        (
            "/v2/models/{model_name}/versions/{model_version}/batchnorm",
            BATCHNORM_MODEL,
            well_formed(server, BATCHNORM_MODEL),
        ),
    ]
    failures: list[Found] = []
    refused: list[str] = []
    for path, model, body in calls:
        operation = schema[path]["POST"]
        parameters = (
            {"model_name": model, "model_version": VERSION} if "{model_version}" in path else {"model_name": model}
        )
        case = operation.Case(path_parameters=parameters, body=body, media_type="application/json")
        response = case.call()
        try:
            case.validate_response(response)  # the checks enabled in CONFIG
        except FailureGroup as group:
            for failure in group.exceptions:
                failures.append(
                    Found(operation.label, failure.title, response.status_code, str(failure), case.as_curl_command())
                )
        if response.status_code != 200:
            refused.append(f"{operation.label} answered {response.status_code}: {case.as_curl_command()}")
    return failures, refused


def report(failures: list[Found], errors: list[str]) -> str:
    lines = [f"{len(failures)} failed checks, {len(errors)} errors"]
    lines += [f"\n[{n}] {found}" for n, found in enumerate(failures, 1)]
    lines += [f"\nerror: {error}" for error in errors]
    return "\n".join(lines)


def test_no_request_breaks_the_server_or_its_openapi_document(server: RunningServer) -> None:
    schema = load_schema(server)
    failures, errors, cases = run(schema)
    more, refused = answers(server, schema)
    failures += more
    if failures or errors:
        pytest.fail(report(failures, errors), pytrace=False)
    # A run that stops reaching the operations (a fixed parameter gone stale, say) would pass on nothing.
    assert cases > 500, f"the run sent only {cases} requests"
    assert not refused, "well-formed requests were refused, so their 200s went unchecked:\n" + "\n".join(refused)
