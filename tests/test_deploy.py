"""deploy/: every Kubernetes manifest validates against the Kubernetes schemas (kubernetes-validate, strict),
the Kustomizations name exactly the files beside them, and the Dockerfiles pass hadolint."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.30.0"
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_the_kubernetes_schema(path):
    import kubernetes_validate

    for doc in docs(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest():
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    (dep,) = docs(K8S / "base" / "gateway-deployment.yaml")
    bad = copy.deepcopy(dep)
    bad["spec"]["replicas"] = "two"
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(ValidationError):  # strict: an unknown field is an error, not silently ignored
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", sorted(K8S.rglob("kustomization.yaml")),
                         ids=lambda p: str(p.parent.relative_to(K8S)))
def test_kustomization_lists_exactly_its_manifests(kustomization):
    (k,) = docs(kustomization)
    here = kustomization.parent
    local = [r for r in k["resources"] if not r.startswith("..")]
    assert sorted(local) == sorted(p.name for p in here.glob("*.yaml") if p.name != "kustomization.yaml")
    for r in k["resources"]:
        assert (here / r).exists(), r


def test_vllm_overlay_points_the_gateway_at_vllm():
    (k,) = docs(K8S / "overlays" / "vllm" / "kustomization.yaml")
    ops = yaml.safe_load(k["patches"][0]["patch"])
    (dep,) = docs(K8S / "base" / "gateway-deployment.yaml")
    assert isinstance(dep["spec"]["template"]["spec"]["containers"][0]["args"], list)  # the patch appends to it
    values = [op["value"] for op in ops]
    (svc,) = docs(K8S / "overlays" / "vllm" / "vllm-service.yaml")
    assert "--backend=openai" in values
    assert f"--upstream-url=http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}/v1" in values


def test_gateway_args_are_ownllm_serve_flags():
    """The Deployment passes flags `ownllm serve` really has (a renamed flag would crash-loop every pod)."""
    from pipeline.cli import build_parser

    (dep,) = docs(K8S / "base" / "gateway-deployment.yaml")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    env = {"OWNLLM_DB_URL": "sqlite:///x.db"}
    (cm,) = docs(K8S / "base" / "gateway-configmap.yaml")
    env.update(cm["data"])
    argv = ["serve", "--host", "0.0.0.0", "--port", "8000"] + [a.replace("$(", "{").replace(")", "}").format(**env)
                                                               for a in args]
    ns = build_parser().parse_args(argv)
    assert ns.engine == "ctranslate2" and ns.workers == 2 and ns.db_url == "sqlite:///x.db"


@pytest.mark.parametrize("dockerfile", sorted((REPO / "deploy").glob("Dockerfile*")), ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in dockerfile.read_text(encoding="utf-8").splitlines():  # what it COPYs exists in the repo
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} (missing)"
