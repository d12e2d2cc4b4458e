"""The closed control plane: model control modes, the API key, cross-origin control requests, readiness."""

from __future__ import annotations

import logging
import re

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service.access import endpoint_group
from service.config import Settings
from tests.service.conftest import ServeFactory, affine_expected, infer_json

KEY = "k3y-for-the-tests-0123456789"
X = np.ones((1, 4), dtype=np.float32)


def infer(url: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/affine/infer", json=infer_json("x", X), headers=headers)


def test_model_control_is_off_by_default_and_the_models_keep_serving(serve: ServeFactory) -> None:
    with serve() as server:
        for action in ("unload", "load"):
            refused = httpx.post(f"{server.url}/v2/repository/models/affine/{action}")
            assert refused.status_code == 403, refused.text
            assert "NORMSERVE_MODEL_CONTROL=explicit" in refused.json()["error"]
        assert httpx.post(f"{server.url}/v2/repository/index").status_code == 200  # still readable
        np.testing.assert_allclose(infer(server.url).json()["outputs"][0]["data"], affine_expected(X)[0].ravel())
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_a_page_on_another_origin_cannot_unload_a_model(serve: ServeFactory, caplog) -> None:
    caplog.set_level(logging.INFO)
    with serve(model_control="explicit") as server:
        unload = f"{server.url}/v2/repository/models/affine/unload"
        # What a form or fetch() on another site can send without a preflight: text/plain, with its Origin.
        cross = httpx.post(
            unload, content=b"{}", headers={"Origin": "http://evil.example", "Content-Type": "text/plain"}
        )
        assert cross.status_code == 403 and "another origin (http://evil.example)" in cross.json()["error"]
        plain = httpx.post(unload, content=b"x", headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415 and "application/json" in plain.json()["error"]
        form = httpx.post(unload, data={"a": "b"}, headers={"Origin": server.url})
        assert form.status_code == 415
        assert infer(server.url).status_code == 200  # nothing was unloaded
        same = httpx.post(unload, json={}, headers={"Origin": server.url})
        assert same.status_code == 200
        assert infer(server.url).status_code == 404
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model control")]
    assert any("refused: 403" in m and "127.0.0.1:" in m for m in logged), logged
    assert any(m.startswith("model control: unload 'affine' from 127.0.0.1:") and "unloaded" in m for m in logged)


def test_readiness_is_false_when_nothing_is_served_and_names_required_models(serve: ServeFactory) -> None:
    with serve(model_control="explicit") as server:
        names = [row["name"] for row in httpx.post(f"{server.url}/v2/repository/index").json()]
        for name in set(names):
            assert httpx.post(f"{server.url}/v2/repository/models/{name}/unload").status_code == 200
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503
        assert f"no model is loaded and ready, of the {len(set(names))} in the repository" in ready.json()["error"]
    with serve(required_models=["affine", "not-there"]) as server:
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503
        error = ready.json()["error"]
        assert "required model 'not-there' (NORMSERVE_REQUIRED_MODELS) is not ready: not loaded" in error
        assert "'affine'" not in error
    with serve(required_models=["affine"]) as server:
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_the_api_key_guards_its_groups_and_never_health(serve: ServeFactory) -> None:
    with serve(api_key=KEY) as server:
        missing = infer(server.url)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer <key>" in missing.json()["error"]
        wrong = infer(server.url, Authorization="Bearer " + KEY[:-1] + "x")
        assert wrong.status_code == 401 and "not this server's" in wrong.json()["error"]
        assert infer(server.url, Authorization=f"Bearer {KEY}").status_code == 200
        assert infer(server.url, **{"X-API-Key": KEY}).status_code == 200
        for path in ("/metrics", "/v2", "/v2/models/affine", "/docs"):
            assert httpx.get(f"{server.url}{path}").status_code == 401, path
        assert httpx.post(f"{server.url}/v2/repository/index").status_code == 401
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert httpx.get(f"{server.url}{path}").status_code == 200, path
        # Readiness is open to probes, but what it says of the models (providers, CUDA errors) is metadata.
        assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
        detailed = httpx.get(f"{server.url}/v2/health/ready", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert detailed["ready"] is True and {m["name"] for m in detailed["models"]} >= {"affine"}
    with serve(api_key=KEY, api_key_protects=["inference", "model_control"], api_key_header="X-Token") as server:
        assert infer(server.url).status_code == 401
        assert infer(server.url, **{"X-Token": KEY}).status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        assert httpx.get(f"{server.url}/v2/models/affine").status_code == 200
        assert "models" in httpx.get(f"{server.url}/v2/health/ready").json()  # metadata is open here: so are they


def test_settings_refuse_a_short_key_and_groups_they_do_not_know() -> None:
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(api_key="short")
    with pytest.raises(ValidationError):
        Settings(api_key_protects=["inference", "everything"])
    assert Settings().model_control == "none" and Settings().api_key is None


@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("/v2/health/ready", None),
        ("/v2/models/m/infer", "inference"),
        ("/v2/models/m/versions/2/batchnorm", "inference"),
        ("/v2/repository/index", "model_control"),
        ("/v2/repository/models/m/unload", "model_control"),
        ("/metrics", "metrics"),
        ("/v2/models/m/config", "metadata"),
        ("/demo", "metadata"),
    ],
)
def test_every_path_falls_in_one_group(path: str, group: str | None) -> None:
    assert endpoint_group(path) == group


def test_errors_name_the_model_asked_for_and_no_server_path(serve: ServeFactory, repository) -> None:
    model_file = repository / "affine" / "1" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:100])  # no longer what was verified
    with serve(repository=repository) as server:
        unknown = infer(server.url).json()  # affine itself is broken now
        other = httpx.post(f"{server.url}/v2/models/nope/infer", json=infer_json("x", X)).json()["error"]
        assert "'nope'" in other and "affine" not in other and "tiny-cnn-bn" not in other
        for answer in (unknown["error"], httpx.get(f"{server.url}/v2/health/ready").text):
            assert "affine" in answer and "sha256" in answer
            assert str(repository) not in answer and str(repository.resolve()) not in answer, answer
            assert "affine/1/model.onnx" in answer  # the file, relative to the repository


def test_refused_control_requests_cannot_forge_or_flood_the_log(serve: ServeFactory, caplog) -> None:
    """A model name with a newline (%0a) cannot start a fake line, and 1,000 refusals with 50 KB names
    write a burst of short lines and a count, not 50 MB."""
    caplog.set_level(logging.INFO)
    forged = "affine%0a2026-12-05 00:00:00,000 INFO    service.routes.repository_api [-] model control: unload"
    with serve() as server:  # control off: every load and unload is refused with 403
        with httpx.Client(base_url=server.url) as client:
            assert client.post(f"/v2/repository/models/{forged}/unload").status_code == 403
            for i in range(1000):
                assert client.post(f"/v2/repository/models/{'n' * 50_000}{i}/load").status_code == 403
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model control")]
    assert "\n" not in lines[0] and "affine\\n2026" in lines[0] and "refused: 403" in lines[0]
    assert all("\n" not in line and len(line) < 1000 for line in lines), max(map(len, lines))
    assert 2 <= len(lines) <= 40, len(lines)  # a burst, not one line a request
    assert re.search(r"\.\.\. \(500\d\d characters\)", lines[1]), lines[1]  # the path, cut to its first characters


def test_the_refusal_log_writes_a_burst_then_counts_what_it_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from service import logs

    now = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    throttle = logs.Throttle(burst=3, window_s=10.0)
    assert [throttle.allow() for _ in range(5)] == [0, 0, 0, None, None]
    now[0] += 10.0
    assert throttle.allow() == 2 and logs.left_out(2) == " (2 more like it not logged)"
    assert logs.client_text("a\nb\x1b[31m\u2028") == "a\\nb\\x1b[31m\\u2028"
    assert logs.client_text("x" * 300, 10) == "xxxxxxxxxx... (300 characters)"


def test_model_control_answers_only_for_the_allowed_host_names(serve: ServeFactory) -> None:
    """DNS rebinding: a page on rebind.example, its name resolved to this server, sends a Host and an Origin
    that match each other. The Host is not one this server answers model control for."""
    with serve(model_control="explicit") as server:
        port = server.url.rsplit(":", 1)[1]
        unload = f"{server.url}/v2/repository/models/affine/unload"
        rebound = {"Host": f"rebind.example:{port}", "Origin": f"http://rebind.example:{port}"}
        refused = httpx.post(unload, json={}, headers=rebound)
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert "Host 'rebind.example:" in error and "NORMSERVE_ALLOWED_HOSTS" in error
        assert infer(server.url).status_code == 200  # nothing was unloaded
        by_name = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
        assert httpx.post(f"{server.url}/v2/repository/index", headers=rebound).status_code == 200  # reading is open
        assert httpx.post(unload, json={}, headers=by_name).status_code == 200
    with serve(model_control="explicit", allowed_hosts=["models.internal"]) as server:
        port = server.url.rsplit(":", 1)[1]
        named = {"Host": f"models.internal:{port}", "Origin": f"http://models.internal:{port}"}
        assert httpx.post(f"{server.url}/v2/repository/models/affine/unload", json={}, headers=named).status_code == 200
