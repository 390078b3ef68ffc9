"""Static checks of deploy/: YAML lint, required fields of the compose and Kubernetes manifests,
the Dockerfiles, and the example settings file covering every settings key."""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from edge.core.config import Settings, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
YAML_FILES = sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))
YAMLLINT_CONFIG = "{extends: default, rules: {line-length: {max: 100}}}"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s(kind: str) -> list[dict[str, Any]]:
    return [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in _docs(p)
            if d.get("kind") == kind]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yamllint_clean(path: Path) -> None:
    config_mod = pytest.importorskip("yamllint.config", reason="yamllint (the dev extra)")
    from yamllint import linter

    problems = list(linter.run(path.read_text(), config_mod.YamlLintConfig(YAMLLINT_CONFIG),
                               str(path)))
    assert not problems, "\n".join(f"{path}:{p.line}:{p.column} {p.rule}: {p.desc}"
                                   for p in problems)


# --- the example settings file ------------------------------------------------------------------

def _nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    """BaseModel classes inside an annotation (tuple[DicomPeer, ...], X | None)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _nested_models(arg)


def test_example_settings_load() -> None:
    load_settings(DEPLOY / "mededge.example.yaml", environ={})


def test_example_settings_set_every_section_key() -> None:
    data = yaml.safe_load((DEPLOY / "mededge.example.yaml").read_text())
    missing = [f"{section}.{key}" for section, info in Settings.model_fields.items()
               for key in typing.cast(type[BaseModel], info.annotation).model_fields
               if key not in (data.get(section) or {})]
    assert not missing, f"deploy/mededge.example.yaml lacks {missing}"


def test_example_settings_show_every_nested_key() -> None:
    """List items (peers, rules and their conditions) are shown as commented examples."""
    text = (DEPLOY / "mededge.example.yaml").read_text()
    missing = []
    for section, info in Settings.model_fields.items():
        for key, field in typing.cast(type[BaseModel], info.annotation).model_fields.items():
            stack = list(_nested_models(field.annotation))
            while stack:
                model = stack.pop()
                for name, sub in model.model_fields.items():
                    if not re.search(rf"^\s*#\s*(- )?{name}:", text, re.MULTILINE):
                        missing.append(f"{section}.{key}[].{model.__name__}.{name}")
                    stack.extend(_nested_models(sub.annotation))
    assert not missing, f"deploy/mededge.example.yaml shows no example of {missing}"


def test_example_settings_comment_every_key() -> None:
    lines = (DEPLOY / "mededge.example.yaml").read_text().splitlines()
    bare = [line.strip() for index, line in enumerate(lines)
            if re.match(r"^\s+[a-z_]+:", line) and "#" not in line
            and not lines[index - 1].lstrip().startswith(("#", "- "))]
    assert not bare, f"keys without a comment: {bare}"


# --- compose ------------------------------------------------------------------------------------

def _compose() -> dict[str, Any]:
    return _docs(DEPLOY / "compose" / "compose.yaml")[0]


def test_compose_services_pinned_and_volumes_declared() -> None:
    compose = _compose()
    assert set(compose["services"]) >= {"mededge", "orthanc", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        image = service.get("image", "")
        assert re.search(r":v?[0-9][\w.-]*$|:x86$", image), f"{name}: image {image!r} not pinned"
        assert not image.endswith(":latest"), f"{name}: :latest"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / "compose" / source).exists(), f"{name}: {source} missing"
            elif not source.startswith("$"):
                assert source in compose["volumes"], f"{name}: volume {source} not declared"


def test_compose_mededge_has_health_gpu_and_data_volume() -> None:
    mededge = _compose()["services"]["mededge"]
    assert "/v2/health/ready" in " ".join(mededge["healthcheck"]["test"])
    assert (DEPLOY.parent / mededge["build"]["dockerfile"]).is_file()
    devices = mededge["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert any(v.endswith(":/var/lib/mededge") for v in mededge["volumes"])
    assert "ORTHANC@orthanc:4242" in mededge["environment"]["MEDEDGE_PIPELINE__DESTINATIONS"]


def test_prometheus_scrapes_mededge_and_loads_the_alerts() -> None:
    config = _docs(DEPLOY / "compose" / "prometheus.yml")[0]
    assert config["rule_files"] == ["alerts.yml"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mededge")
    assert job["static_configs"][0]["targets"] == ["mededge:8002"]


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    datasource = _docs(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")[0]
    assert datasource["datasources"][0]["uid"] == "prometheus"
    provider = _docs(DEPLOY / "grafana/provisioning/dashboards/mededge.yaml")[0]
    mount = next(v for v in _compose()["services"]["grafana"]["volumes"]
                 if v.startswith("../grafana/dashboards:"))
    assert provider["providers"][0]["options"]["path"] == mount.split(":")[1]


# --- Kubernetes ---------------------------------------------------------------------------------

def test_k8s_deployments_have_probes_gpu_and_spool() -> None:
    deployments = _k8s("Deployment")
    assert len(deployments) >= 2
    claims = {d["metadata"]["name"] for d in _k8s("PersistentVolumeClaim")}
    maps = {d["metadata"]["name"] for d in _k8s("ConfigMap")}
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert deployment["spec"]["strategy"]["type"] == "Recreate", name  # one ledger owner
        container = pod["containers"][0]
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live", name
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready", name
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"dicom": 11112, "grpc": 8001, "http": 8002}, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        spool = volumes[mounts["/var/lib/mededge"]]
        assert spool["persistentVolumeClaim"]["claimName"] in claims, name
        assert volumes[mounts["/etc/mededge"]]["configMap"]["name"] in maps, name


def test_k8s_configmap_is_valid_settings(tmp_path: Path) -> None:
    (config,) = _k8s("ConfigMap")
    path = tmp_path / "mededge.yaml"
    path.write_text(config["data"]["mededge.yaml"])
    load_settings(path, environ={})


def test_k8s_services_select_one_pool_and_servicemonitor_matches() -> None:
    services = _k8s("Service")
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in _k8s("Deployment")]
    for service in services:
        selected = [p for p in pods if service["spec"]["selector"].items() <= p.items()]
        assert len(selected) == 1, f"{service['metadata']['name']} selects {len(selected)} pools"
    (monitor,) = _k8s("ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    matched = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
    assert len(matched) == len(services)
    port = monitor["spec"]["endpoints"][0]["port"]
    assert all(port in {p["name"] for p in s["spec"]["ports"]} for s in matched)
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _docs(DEPLOY / "k8s" / "kustomization.yaml")[0]
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


# --- Dockerfiles --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Dockerfile.x86", "Dockerfile.jetson"])
def test_dockerfile_pinned_nonroot_healthy(name: str) -> None:
    text = (DEPLOY / "docker" / name).read_text()
    bases = re.findall(r"^ARG (?:CUDA|L4T)_IMAGE=(\S+)$", text, re.MULTILINE)
    assert len(bases) == 1 and re.search(r":(r?\d+\.\d+\.\d+)", bases[0]), bases
    assert re.search(r"^USER mededge$", text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n.*/v2/health/ready", text, re.MULTILINE)
    assert 'VOLUME ["/var/lib/mededge"]' in text
    assert "ARG MODELS" in text and "EXPOSE 11112 8001 8002" in text
    assert "onnxruntime-gpu==" in text
    for source in re.findall(r"^COPY (?!--from)(\S+) ", text, re.MULTILINE):
        assert source == "." or (DEPLOY.parent / source).exists(), source
