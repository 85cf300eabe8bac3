"""The deployment files, checked by the validators that install here: `deploy/compose.yaml` against the Compose
Specification's JSON Schema (check-jsonschema's vendored copy), the Helm chart with Helm itself (`helm lint`,
`helm template`; `make test` fetches Helm into .tools/) and its rendered manifests against Kubernetes' own schemas
(kubernetes-validate, strict: unknown fields are errors). Then what the issue asks of them, read off the files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.server import ROOT

COMPOSE = ROOT / "deploy" / "compose.yaml"
CHART = ROOT / "deploy" / "helm" / "grok3d"
HELM = ROOT / ".tools" / "helm"
KUBERNETES_VERSION = "1.33.0"
DB_URL = "postgresql+psycopg://grok3d:secret@db:5432/grok3d"


def run(*command: str | Path) -> str:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_compose_file_follows_the_compose_specification():
    run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE)


def test_compose_runs_the_parts_of_a_multi_machine_deployment():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["s3"]["image"].startswith("chrislusf/seaweedfs:")  # Apache-2.0
    assert services["proxy"]["image"].startswith("caddy:")  # Apache-2.0
    [gpu] = services["triposr"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert "runners.triposr.service:TripoSRService" in services["triposr"]["command"]
    api = services["api"]
    assert api["deploy"]["replicas"] == 2
    env = api["environment"]
    assert env["GROK3D_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["GROK3D_ASSETS_URL"].startswith("s3://") and env["GROK3D_S3_ENDPOINT"] == "http://s3:8333"
    assert env["GROK3D_TRIPOSR_URL"] == "http://triposr:3000"
    assert int(api["stop_grace_period"].rstrip("s")) > int(env["GROK3D_LEASE_S"])


@pytest.fixture(scope="module")
def helm() -> Path:
    if not HELM.exists():
        pytest.fail("Helm is missing: `make .tools/helm` fetches it (make test does)")
    return HELM


def render(helm: Path, *sets: str) -> list[dict]:
    args = [arg for s in (f"database.url={DB_URL}", *sets) for arg in ("--set", s)]
    return [doc for doc in yaml.safe_load_all(run(helm, "template", "t", CHART, *args)) if doc]


def test_helm_lints_the_chart(helm):
    run(helm, "lint", "--strict", CHART, "--set", f"database.url={DB_URL}")


@pytest.mark.parametrize("sets", [(), ("autoscaling.enabled=true", "storage.accessKeyId=a", "storage.secretAccessKey=b",
                                       "xai.apiKey=k")], ids=["defaults", "autoscaling-and-secrets"])
def test_rendered_manifests_follow_the_kubernetes_schemas(helm, tmp_path, sets):
    docs = render(helm, *sets)
    core = [d for d in docs if not d["apiVersion"].startswith("keda.sh/")]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(core))
    run(sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION, path)


def deployment(docs: list[dict], component: str) -> dict:
    [found] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith(component)]
    return found


def test_the_chart_deploys_api_and_triposr_with_probes_secrets_and_grace(helm):
    docs = render(helm)
    lease = yaml.safe_load((CHART / "values.yaml").read_text())["leaseSeconds"]
    for component in ("api", "triposr"):
        pod = deployment(docs, component)["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert pod["terminationGracePeriodSeconds"] > lease
    api = deployment(docs, "api")
    assert api["spec"]["replicas"] == 2
    env = {e["name"]: e for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GROK3D_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "t-grok3d-database", "key": "url"}
    assert env["GROK3D_TRIPOSR_URL"]["value"] == "http://t-grok3d-triposr:3000"
    assert env["GROK3D_LEASE_S"]["value"] == str(lease)
    triposr = deployment(docs, "triposr")["spec"]["template"]["spec"]["containers"][0]
    assert triposr["resources"]["limits"]["nvidia.com/gpu"] == 1
    [secret] = [d for d in docs if d["kind"] == "Secret"]
    assert secret["stringData"]["url"] == DB_URL
    assert not [d for d in docs if d["kind"] == "ScaledObject"]  # autoscaling is opt-in


def test_autoscaling_on_queue_depth_and_existing_secrets(helm):
    docs = render(helm, "autoscaling.enabled=true", "storage.existingSecret=s3-keys", "xai.existingSecret=xai")
    [scaled] = [d for d in docs if d["kind"] == "ScaledObject"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql" and "status IN ('queued', 'processing')" in trigger["metadata"]["query"]
    assert "replicas" not in deployment(docs, "api")["spec"]  # KEDA owns the count
    env = {e["name"]: e for e in deployment(docs, "api")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-keys"
    assert env["XAI_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "xai"
    [secret] = [d for d in docs if d["kind"] == "Secret"]
    assert secret["stringData"]["pgurl"] == "postgresql://grok3d:secret@db:5432/grok3d"  # libpq's form, for KEDA


def test_the_chart_refuses_a_grace_period_within_the_lease(helm):
    args = ["template", "t", CHART, "--set", f"database.url={DB_URL}", "--set", "terminationGracePeriodSeconds=30"]
    done = subprocess.run([str(helm), *map(str, args)], capture_output=True, text=True)
    assert done.returncode != 0 and "longer than leaseSeconds" in done.stderr
