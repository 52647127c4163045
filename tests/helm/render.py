"""Rendering the chart with Helm's own Go SDK (PyPI helm-python-sdk) and reading the result.

`render` passes the API versions a cluster serves (Helm's `--api-versions`), which the SDK's
Python wrapper does not expose but its C ABI (`helm_render` options) takes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from helm_python import _native

RELEASE = "rel"
NAMESPACE = "moe-test"
MONITORING_APIS = ["monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PodMonitor"]


def render(chart_dir: Path, values: dict[str, Any], api_versions: list[str] | None = None,
           namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included)."""
    chart = helm.Chart.load(str(chart_dir))
    opts = {"name": RELEASE, "namespace": namespace, "is_install": True,
            "api_versions": api_versions or []}
    out = _native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts))
    return json.loads(out)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a render, in template order."""
    out = []
    for name in sorted(rendered):
        if name.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[name]):
            if doc:
                doc.setdefault("_template", name)
                out.append(doc)
    return out


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def values_file(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


_VAR = re.compile(r"\$\((\w+)\)")


def pod_env(container: dict[str, Any], workload: dict[str, Any], ordinal: int) -> dict[str, str]:
    """The values a container's `$(VAR)` references take in pod `ordinal` of `workload` (literal
    env values and the downward-API fields the chart uses)."""
    name = f"{workload['metadata']['name']}-{ordinal}"
    fields = {
        "metadata.name": name,
        "metadata.namespace": NAMESPACE,
        "metadata.labels['apps.kubernetes.io/pod-index']": str(ordinal),
    }
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            if path not in fields:
                raise AssertionError(f"{container['name']}: env {e['name']} from unknown field {path}")
            env[e["name"]] = fields[path]
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion of container args (an undefined name stays as written)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), arg)


def flag_values(args: list[str]) -> dict[str, str]:
    """`--flag=value` arguments as a dict (the chart always writes the `=` form)."""
    out = {}
    for a in args:
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            out[k] = v
    return out
