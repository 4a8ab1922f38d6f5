"""Offline validation of Kubernetes objects for the Helm chart and k8s/ tests.

KubeRay kinds (RayCluster, RayJob, RayService) are checked against the CustomResourceDefinitions that
KubeRay v1.7.0 publishes, read from ``../shared/k8s-schemas/kuberay`` next to the repository. Their
``openAPIV3Schema`` is a Kubernetes *structural* schema, close to but not quite JSON Schema;
``crd_schema_to_jsonschema`` turns it into one ``jsonschema`` can run:

- ``x-kubernetes-int-or-string: true`` becomes ``type: [integer, string]`` (the CRDs spell it as an
  ``anyOf`` of both as well, which is dropped);
- ``nullable: true`` adds ``null`` to the type;
- every other ``x-kubernetes-*`` key (list/map types, CEL ``x-kubernetes-validations``) is dropped:
  those rules need the API server;
- an object schema with ``properties`` and no ``additionalProperties`` gets
  ``additionalProperties: false``, as the API server's strict field validation (kubectl's default)
  rejects unknown fields, unless the schema says ``x-kubernetes-preserve-unknown-fields``.

``format: int32`` / ``int64`` ranges are checked; other formats are not.

Core kinds, and every pod template embedded in a KubeRay object, are checked with the
``kubernetes-validate`` package (strict mode: unknown fields fail).

``kuberay_rule_errors`` adds the checks the KubeRay operator makes when it reconciles an object (it
rejects these objects with an event, after ``kubectl apply`` has succeeded).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
KUBERAY_SCHEMA_DIR = REPO_ROOT.parent / "shared" / "k8s-schemas" / "kuberay"
KUBERNETES_VERSION = "1.30"
KUBERAY_GROUP = "ray.io"

# Keys whose values are data, not schemas: never rewritten.
_LITERAL_KEYS = frozenset({"default", "enum", "example", "required", "description", "pattern", "format"})
# Keys whose values map names to schemas.
_SCHEMA_MAP_KEYS = frozenset({"properties", "patternProperties", "definitions"})

# The C loader parses the CRDs ten times faster than the pure-Python one.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_FORMAT_CHECKER = jsonschema.FormatChecker(formats=())


@_FORMAT_CHECKER.checks("int32")
def _is_int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMAT_CHECKER.checks("int64")
def _is_int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def crd_schema_to_jsonschema(node: Any) -> Any:
    """Return a JSON Schema (draft 7) equivalent of a CRD ``openAPIV3Schema`` node (see module doc)."""
    if isinstance(node, list):
        return [crd_schema_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in _LITERAL_KEYS:
            out[key] = value
        elif key in _SCHEMA_MAP_KEYS:
            out[key] = {name: crd_schema_to_jsonschema(sub) for name, sub in value.items()}
        else:
            out[key] = crd_schema_to_jsonschema(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


class KubeRaySchemas:
    """Validators for every served version of the KubeRay CRDs in a folder, built on first use."""

    def __init__(self, schema_dir: Path = KUBERAY_SCHEMA_DIR) -> None:
        self._schemas: dict[tuple[str, str], dict] = {}
        self._validators: dict[tuple[str, str], jsonschema.Draft7Validator] = {}
        for path in sorted(schema_dir.glob("*.yaml")):
            crd = yaml.load(path.read_text(), Loader=_YAML_LOADER)
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", False):
                    self._schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
        if not self._schemas:
            raise FileNotFoundError(f"no CustomResourceDefinitions in {schema_dir}")

    @property
    def kinds(self) -> list[tuple[str, str]]:
        return sorted(self._schemas)

    def validator(self, api_version: str, kind: str) -> jsonschema.Draft7Validator | None:
        key = (api_version, kind)
        if key not in self._validators and key in self._schemas:
            schema = crd_schema_to_jsonschema(self._schemas[key])
            jsonschema.Draft7Validator.check_schema(schema)
            self._validators[key] = jsonschema.Draft7Validator(schema, format_checker=_FORMAT_CHECKER)
        return self._validators.get(key)

    def errors(self, obj: dict) -> list[str]:
        """Schema violations of one KubeRay object, one line each; empty when it is valid."""
        validator = self.validator(obj.get("apiVersion"), obj.get("kind"))
        if validator is None:
            return [f"{_describe(obj)}: no CRD schema for {obj.get('apiVersion')} {obj.get('kind')}"]
        found = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
        return [f"{_describe(obj)}: {_path(e.absolute_path)}: {e.message}" for e in found]


@functools.cache
def kuberay_schemas() -> KubeRaySchemas:
    """The KubeRay CRDs, loaded once per test session (the three files hold ~60k lines of YAML)."""
    return KubeRaySchemas()


def is_kuberay(obj: dict) -> bool:
    return str(obj.get("apiVersion", "")).split("/")[0] == KUBERAY_GROUP


def core_errors(obj: dict) -> list[str]:
    """Violations of a core Kubernetes object against kubernetes-validate's strict schema."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_describe(obj)}: {_path(e.path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{_describe(obj)}: {e.message}"]
    return []


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(dotted path, pod template) for every pod template embedded in a KubeRay object."""
    spec = obj.get("spec") or {}
    cluster_specs = {
        "RayCluster": ("spec", spec),
        "RayJob": ("spec.rayClusterSpec", spec.get("rayClusterSpec")),
        "RayService": ("spec.rayClusterConfig", spec.get("rayClusterConfig")),
    }
    where, cluster = cluster_specs.get(obj.get("kind"), ("", None))
    if cluster:
        yield f"{where}.headGroupSpec.template", cluster["headGroupSpec"]["template"]
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            yield f"{where}.workerGroupSpecs[{i}].template", group["template"]
    if obj.get("kind") == "RayJob" and spec.get("submitterPodTemplate"):
        yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]


def pod_template_errors(obj: dict) -> list[str]:
    """Check each embedded pod template as a core PodTemplate (stricter than the CRD's copy)."""
    found = []
    for where, template in pod_templates(obj):
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        found += [f"{_describe(obj)} {where}: {err.split(': ', 1)[1]}" for err in core_errors(wrapper)]
    return found


_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Longest names the operator accepts (ray-operator/controllers/ray/utils/constant.go).
_MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _cluster_rule_errors(where: str, cluster: dict, kind: str) -> list[str]:
    found = []
    head = cluster["headGroupSpec"]
    if not head["template"].get("spec", {}).get("containers"):
        found.append(f"{where}.headGroupSpec: the head pod template has no container")
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") == "token":
        if _version_tuple(cluster.get("rayVersion", "0")) < (2, 52, 0):
            found.append(
                f"{where}: authOptions.mode token needs rayVersion >= 2.52.0, got {cluster.get('rayVersion')!r}"
            )
        if auth.get("enableK8sTokenAuth") and kind in ("RayJob", "RayService"):
            found.append(f"{where}: authOptions.enableK8sTokenAuth is not supported for a {kind}")
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    ray_start_resources = ("num-cpus", "num-gpus", "memory", "resources")
    groups = [("headGroupSpec", head)] + [
        (f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])
    ]
    for name, group in groups:
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in ray_start_resources):
            found.append(f"{where}.{name}: resources are set both in rayStartParams and in resources")
        if "labels" in params:
            found.append(f"{where}.{name}: rayStartParams['labels'] is not supported; use the labels field")
    for name, group in groups[1:]:
        if not group["template"].get("spec", {}).get("containers"):
            found.append(f"{where}.{name}: the pod template has no container")
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            found.append(f"{where}.{name}: minReplicas and maxReplicas are required without autoscaling")
        if low is not None and high is not None and low > high:
            found.append(f"{where}.{name}: minReplicas {low} > maxReplicas {high}")
    return found


def kuberay_rule_errors(obj: dict) -> list[str]:
    """Rules the KubeRay v1.7 operator enforces when it reconciles (utils/validation.go)."""
    kind, name = obj.get("kind"), obj.get("metadata", {}).get("name", "")
    spec = obj.get("spec") or {}
    found = []
    if not _DNS1035.match(name) or len(name) > _MAX_NAME.get(kind, 63):
        found.append(
            f"metadata.name {name!r}: a {kind} name must be a DNS-1035 label of <= {_MAX_NAME.get(kind)} chars"
        )
    if kind == "RayCluster":
        found += _cluster_rule_errors("spec", spec, kind)
    elif kind == "RayService":
        cluster = spec["rayClusterConfig"]
        found += _cluster_rule_errors("spec.rayClusterConfig", cluster, kind)
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = [p.get("name", "") for p in head.get("ports") or []]
        if ports and not any(p == "serve" or p.startswith("serve-") for p in ports) and not spec.get("serveService"):
            found.append("spec.rayClusterConfig: the head container declares ports but none named 'serve'")
        try:
            yaml.safe_load(spec.get("serveConfigV2", ""))
        except yaml.YAMLError as e:
            found.append(f"spec.serveConfigV2 is not YAML: {e}")
    elif kind == "RayJob":
        if spec.get("rayClusterSpec") is None and not spec.get("clusterSelector"):
            found.append("spec: one of rayClusterSpec or clusterSelector must be set")
        if spec.get("rayClusterSpec") is not None:
            found += _cluster_rule_errors("spec.rayClusterSpec", spec["rayClusterSpec"], kind)
        if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
            found.append("spec: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if spec.get("backoffLimit", 0) < 0:
            found.append("spec.backoffLimit must not be negative")
        if spec.get("submissionMode") == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
            found.append("spec: backoffLimit is incompatible with InteractiveMode")
        if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
            found.append("spec.activeDeadlineSeconds must be positive")
        try:
            yaml.safe_load(spec.get("runtimeEnvYAML", ""))
        except yaml.YAMLError as e:
            found.append(f"spec.runtimeEnvYAML is not YAML: {e}")
    return [f"{_describe(obj)}: {msg}" for msg in found]


MONITORING_GROUP = "monitoring.coreos.com"
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def monitoring_errors(obj: dict) -> list[str]:
    """A minimal structural check of Prometheus Operator kinds (PodMonitor, ServiceMonitor, PrometheusRule).

    No schema for monitoring.coreos.com is available offline (its CRDs are not in ../shared/k8s-schemas
    and kubernetes-validate ships core kinds only), so this checks what the chart relies on: the fields
    it sets, their types, durations and, for rules, that each has a name and an expression.
    """
    found: list[str] = []
    kind, spec = obj.get("kind"), obj.get("spec")
    if obj.get("apiVersion") != f"{MONITORING_GROUP}/v1":
        found.append(f"apiVersion {obj.get('apiVersion')!r} is not {MONITORING_GROUP}/v1")
    if not _DNS1123.match(obj.get("metadata", {}).get("name", "")):
        found.append("metadata.name is not a DNS-1123 subdomain")
    if not isinstance(spec, dict):
        return [f"{_describe(obj)}: spec is missing"]
    endpoints_key = {"PodMonitor": "podMetricsEndpoints", "ServiceMonitor": "endpoints"}.get(kind)
    if endpoints_key:
        allowed = {"selector", "namespaceSelector", endpoints_key, "jobLabel", "podTargetLabels", "targetLabels"}
        found += [f"spec.{k}: unknown field" for k in set(spec) - allowed]
        selector = spec.get("selector")
        if not isinstance(selector, dict) or not selector.get("matchLabels"):
            found.append("spec.selector.matchLabels must be a non-empty map")
        elif not all(isinstance(v, str) for v in selector["matchLabels"].values()):
            found.append("spec.selector.matchLabels values must be strings")
        endpoints = spec.get(endpoints_key)
        if not isinstance(endpoints, list) or not endpoints:
            found.append(f"spec.{endpoints_key} must be a non-empty list")
        for i, ep in enumerate(endpoints or []):
            if not isinstance(ep.get("port"), str):
                found.append(f"spec.{endpoints_key}[{i}].port must be a port name")
            if "interval" in ep and not _DURATION.match(str(ep["interval"])):
                found.append(f"spec.{endpoints_key}[{i}].interval {ep['interval']!r} is not a duration")
    elif kind == "PrometheusRule":
        found += [f"spec.{k}: unknown field" for k in set(spec) - {"groups"}]
        for i, group in enumerate(spec.get("groups") or []):
            if not group.get("name") or not group.get("rules"):
                found.append(f"spec.groups[{i}] needs a name and rules")
            for j, rule in enumerate(group.get("rules") or []):
                if bool(rule.get("alert")) == bool(rule.get("record")) or not isinstance(rule.get("expr"), str):
                    found.append(f"spec.groups[{i}].rules[{j}] needs exactly one of alert/record, and an expr")
                if "for" in rule and not _DURATION.match(str(rule["for"])):
                    found.append(f"spec.groups[{i}].rules[{j}].for {rule['for']!r} is not a duration")
                for key in ("labels", "annotations"):
                    if not all(isinstance(v, str) for v in (rule.get(key) or {}).values()):
                        found.append(f"spec.groups[{i}].rules[{j}].{key} values must be strings")
    else:
        found.append(f"unexpected kind {kind}")
    return [f"{_describe(obj)}: {msg}" for msg in found]


def object_errors(obj: dict, kuberay: KubeRaySchemas) -> list[str]:
    """Every problem found in one object: schema, embedded pod templates, operator rules."""
    if str(obj.get("apiVersion", "")).split("/")[0] == MONITORING_GROUP:
        return monitoring_errors(obj)
    if not is_kuberay(obj):
        return core_errors(obj)
    found = kuberay.errors(obj)
    if found:  # the deeper checks below assume the CRD's shape
        return found
    return pod_template_errors(obj) + kuberay_rule_errors(obj)


def _describe(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def _path(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "(root)"
