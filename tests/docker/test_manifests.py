"""The Kubernetes and KServe manifests (docker/k8s/): valid for the API server, and consistent with the image.

Validated offline as a cluster would: kubernetes-validate --strict (Kubernetes' own schemas, unknown
fields refused) for the Kubernetes kinds, check-jsonschema against KServe's CRD schema for the
InferenceService, yamllint on every YAML file of docker/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
BIN = Path(sys.executable).parent
KUBERNETES_KINDS = ["deployment.yaml", "deployment-gpu.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"]
SHUTDOWN_TIMEOUT_S = 30  # NORMSERVE_SHUTDOWN_TIMEOUT_S in the image and the manifests


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((K8S / name).read_text())
    return document


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("name", KUBERNETES_KINDS)
def test_each_kubernetes_manifest_passes_strict_validation(name: str) -> None:
    result = run(str(BIN / "kubernetes-validate"), "--strict", str(K8S / name))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout + result.stderr


def test_strict_validation_refuses_an_unknown_field(tmp_path: Path) -> None:
    broken = load("deployment.yaml")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    assert run(str(BIN / "kubernetes-validate"), "--strict", str(tmp_path / "broken.yaml")).returncode != 0


def test_the_inferenceservice_passes_kserves_own_schema_and_speaks_v2(tmp_path: Path) -> None:
    schema = str(K8S / "schema" / "kserve-inferenceservice-v1beta1.schema.json")
    result = run(str(BIN / "check-jsonschema"), "--schemafile", schema, str(K8S / "inferenceservice.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    model = load("inferenceservice.yaml")["spec"]["predictor"]["model"]
    runtime = load("servingruntime.yaml")
    assert model["protocolVersion"] == "v2" and model["runtime"] == runtime["metadata"]["name"]
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    ports = {p["name"]: p["containerPort"] for p in runtime["spec"]["containers"][0]["ports"]}
    env = {e["name"]: e["value"] for e in runtime["spec"]["containers"][0]["env"]}
    assert ports == {"h1c": int(env["NORMSERVE_PORT"]), "h2c": int(env["NORMSERVE_GRPC_PORT"])}
    assert runtime["spec"]["supportedModelFormats"][0]["name"] == model["modelFormat"]["name"]
    wrong = load("inferenceservice.yaml")
    wrong["spec"]["predictor"]["model"]["protocolVersions"] = "v2"  # a typo KServe would refuse
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    assert run(str(BIN / "check-jsonschema"), "--schemafile", schema, str(tmp_path / "wrong.yaml")).returncode != 0


def test_the_scaledobject_passes_kedas_own_schema_and_scales_the_deployment_on_its_queue(tmp_path: Path) -> None:
    schema = str(K8S / "schema" / "keda-scaledobject-v1alpha1.schema.json")
    result = run(str(BIN / "check-jsonschema"), "--schemafile", schema, str(K8S / "scaledobject.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    scaled = load("scaledobject.yaml")["spec"]
    assert scaled["scaleTargetRef"]["name"] == load("deployment.yaml")["metadata"]["name"]
    assert scaled["minReplicaCount"] == load("hpa.yaml")["spec"]["minReplicas"]  # the same floor without KEDA
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus" and "normserve_pending_requests" in trigger["metadata"]["query"]
    wrong = load("scaledobject.yaml")
    wrong["spec"]["minReplicas"] = 2  # the HPA's name for it, not KEDA's
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    refused = run(str(BIN / "check-jsonschema"), "--schemafile", schema, str(tmp_path / "wrong.yaml"))
    assert refused.returncode != 0 and "minReplicas" in refused.stdout + refused.stderr


def test_yamllint_passes_on_every_deployment_file() -> None:
    result = run(str(BIN / "yamllint"), "--strict", "docker/", ".yamllint.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["deployment.yaml", "deployment-gpu.yaml"])
def test_the_deployments_probe_stop_and_lock_down_as_the_image_expects(name: str, monkeypatch) -> None:
    pod = load(name)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    # The control plane is closed, and the API key comes from a Secret, never from the manifest.
    secret = next(e for e in container["env"] if e["name"] == "NORMSERVE_API_KEY")["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "normserve-api-key", "key": "api-key", "optional": True}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # every value the manifest sets is one the service takes
    assert settings.model_control == "none" and "metrics" not in settings.api_key_protects
    # CPU: a pod not ready after 5 minutes restarts. GPU: a pod on CPU stays, not ready, to be looked at.
    # CPU: the startup probe asks gRPC's health service (ready as /v2/health/ready says) on the pod's gRPC port.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.port, "grpc": settings.grpc_port}
    if name == "deployment-gpu.yaml":
        assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    else:
        assert container["startupProbe"]["grpc"] == {"port": settings.grpc_port}
    # gRPC connections are closed after a while, so that a Service spreads them over new replicas.
    assert settings.grpc_max_connection_age_s is not None and settings.grpc_max_connection_age_s <= 600
    assert pod["enableServiceLinks"] is False  # the Service normserve would set NORMSERVE_PORT=tcp://...
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # The grace covers the drain and the shutdown: SIGTERM never cuts accepted requests short. The server
    # drains itself (readiness 503 while it still serves), so no preStop sleep stands in for it.
    assert "lifecycle" not in container
    assert pod["terminationGracePeriodSeconds"] > settings.drain_s + SHUTDOWN_TIMEOUT_S and settings.drain_s >= 5
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert container["volumeMounts"] == [{"name": "models", "mountPath": env["NORMSERVE_REPOSITORY"], "readOnly": True}]
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == "1") == (name == "deployment-gpu.yaml")
    if gpus:
        assert env["NORMSERVE_PROVIDER"] == "cuda" and env["NORMSERVE_REQUIRE_GPU"] == "true"


def test_the_service_hpa_and_pdb_select_the_deployments_pods() -> None:
    cpu = load("deployment.yaml")
    labels = cpu["spec"]["template"]["metadata"]["labels"]
    service = load("service.yaml")["spec"]
    assert service["selector"].items() <= labels.items()
    assert service["ports"][0]["targetPort"] == cpu["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    assert load("hpa.yaml")["spec"]["scaleTargetRef"]["name"] == cpu["metadata"]["name"]
    assert load("pdb.yaml")["spec"]["selector"]["matchLabels"] == cpu["spec"]["selector"]["matchLabels"]
