"""Checks helm/moe-cluster: lint, render (default values and every ci/*-values.yaml) with Helm's
own Go SDK, validate every object with kubernetes-validate --strict, and assert on the rendered
objects against the real `moe` binary and the real processes it starts.

Usage: check_chart.py MOE_BINARY   (run by the `helm_chart` cargo test; .ci/run installs the venv)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import kubernetes_validate
import yaml

import live
from render import (MONITORING_APIS, NAMESPACE, expand, flag_values, objects, pod_env,
                    pod_labels, pod_spec, render, selects, strip, values_file)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "moe-cluster"
MODEL = ROOT / "tests" / "fixtures" / "models" / "tiny-dsv3"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the validator knows.
KUBE_VERSIONS = ["1.28.0", kubernetes_validate.utils.latest_version()]
ROLES = ("router", "expert-node", "coordinator")
RECOMMENDED = ("name", "instance", "component", "version", "managed-by", "part-of")
LISTEN_FLAGS = {"moe": ("--listen", "--metrics-listen"),
                "etcd": ("--listen-client-urls", "--listen-peer-urls", "--listen-metrics-urls")}

failures: list[str] = []


def check(name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
        print(f"ok   {name}")
    except AssertionError as e:
        failures.append(f"{name}: {e}")
        print(f"FAIL {name}: {e}")


def value_sets() -> dict[str, dict[str, Any]]:
    sets = {"default": {}}
    for f in sorted((CHART / "ci").glob("*-values.yaml")):
        sets[f"ci/{f.name}"] = values_file(f)
    assert len(sets) >= 3, "expected ci/*-values.yaml files"
    return sets


def lint(values: dict[str, Any]) -> None:
    report = helm.lint(str(CHART), values, strict=True, kube_version="v" + KUBE_VERSIONS[-1])
    bad = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not bad, f"helm lint: {bad}"


def kube_validate(objs: list[dict[str, Any]]) -> None:
    for o in objs:
        if o["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRD kinds: checked structurally in monitoring()
        for v in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(strip(o), v, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{o['kind']}/{o['metadata']['name']} on {v}: {e.message} at {list(e.path)}")
            except kubernetes_validate.SchemaNotFoundError as e:
                raise AssertionError(f"{o['kind']} has no schema on {v}: {e}")


def moe_containers(objs):
    """(workload, container) for every container running the moe image, with its role."""
    for o in objs:
        spec = pod_spec(o)
        for c in (spec or {}).get("containers", []) + (spec or {}).get("initContainers", []):
            if c.get("args") and c["args"][0] in ROLES:
                yield o, c


def etcd_containers(objs):
    for o in objs:
        for c in (pod_spec(o) or {}).get("containers", []):
            if c.get("command", [""])[0].endswith("etcd"):
                yield o, c


def args_are_flags(objs, moe: Path, helps: dict[str, live.Help]) -> None:
    seen = set()
    for w, c in moe_containers(objs):
        role, args = c["args"][0], c["args"][1:]
        seen.add(role)
        h = helps[role]
        for a in args:
            assert a.startswith("--"), f"{role}: argument {a!r} is not a flag"
            flag = a.split("=", 1)[0]
            assert flag in h.flags, f"{role}: {flag} is not a flag of `moe {role} --help`"
        for e in c.get("env", []):
            if e["name"].startswith("MOE_"):
                assert e["name"] in h.env, f"{role}: env {e['name']} is not one `moe {role} --help` lists"
        env = pod_env(c, w, 0)
        err = live.accepts(moe, [role], [expand(a, env) for a in args])
        assert err is None, f"moe {role} rejects the chart's arguments: {err}"
    assert seen == set(ROLES), f"roles rendered: {sorted(seen)}"


def port_of(container: dict[str, Any], port: int | str) -> int:
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    raise AssertionError(f"{container['name']}: port {port!r} is not a containerPort")


def listening_flag(container: dict[str, Any], number: int) -> str:
    """The flag of `container` that listens on `number`."""
    kind = "moe" if container.get("args", [""])[0] in ROLES else "etcd"
    flags = flag_values(container["args"])
    for f in LISTEN_FLAGS[kind]:
        if f in flags and flags[f].rstrip("/").rsplit(":", 1)[-1] == str(number):
            return f
    raise AssertionError(f"{container['name']}: no listening flag on port {number} in {container['args']}")


def probes_served(objs, cluster: live.Cluster) -> None:
    checked = 0
    for w, c in list(moe_containers(objs)) + list(etcd_containers(objs)):
        role = c["args"][0] if c["args"][0] in ROLES else "etcd"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            assert probe, f"{role}: no {kind}"
            if "httpGet" in probe:
                number = port_of(c, probe["httpGet"]["port"])
                addr = cluster.addr[role][listening_flag(c, number)]
                status = live.wait_http_ok(addr, probe["httpGet"]["path"])
                assert status == 200, f"{role} {kind}: GET {probe['httpGet']['path']} on {listening_flag(c, number)} -> {status}"
            elif "tcpSocket" in probe:
                number = port_of(c, probe["tcpSocket"]["port"])
                addr = cluster.addr[role][listening_flag(c, number)]
                assert live.tcp_open(addr), f"{role} {kind}: nothing listens on {addr}"
            else:
                raise AssertionError(f"{role} {kind}: {probe} (httpGet or tcpSocket expected)")
            checked += 1
    want = 3 * (len(ROLES) + (1 if list(etcd_containers(objs)) else 0))
    assert checked == want, f"{checked} probes, want {want}"


def services_target_pods(objs) -> None:
    workloads = [o for o in objs if pod_spec(o)]
    for s in (o for o in objs if o["kind"] == "Service"):
        sel = s["spec"].get("selector", {})
        targets = [w for w in workloads if selects(sel, pod_labels(w))]
        assert targets, f"Service {s['metadata']['name']} selects no pods"
        for w in targets:
            containers = pod_spec(w)["containers"]
            for p in s["spec"]["ports"]:
                tp = p.get("targetPort", p["port"])
                ok = any(port_in(c, tp) for c in containers)
                assert ok, f"Service {s['metadata']['name']} targetPort {tp!r} is no containerPort of {w['metadata']['name']}"


def port_in(c, tp) -> bool:
    return any(tp in (p["containerPort"], p.get("name")) for p in c.get("ports", []))


def expert_nodes(objs) -> None:
    sts = [w for w, c in moe_containers(objs) if c["args"][0] == "expert-node"]
    assert len(sts) == 1 and sts[0]["kind"] == "StatefulSet", "expert nodes are one StatefulSet"
    w = sts[0]
    c = next(c for c in pod_spec(w)["containers"] if c["args"][0] == "expert-node")
    n = w["spec"]["replicas"]
    headless = [s for s in objs if s["kind"] == "Service" and s["metadata"]["name"] == w["spec"]["serviceName"]]
    assert headless and headless[0]["spec"].get("clusterIP") == "None", "serviceName is a headless Service"
    assert selects(headless[0]["spec"]["selector"], pod_labels(w)), "the headless Service selects the nodes"
    grpc = port_of(c, listening_port(flag_values(c["args"])["--listen"]))
    ids, adverts = [], []
    for i in range(n):
        f = flag_values([expand(a, pod_env(c, w, i)) for a in c["args"]])
        ids.append(f["--node-id"])
        adverts.append(f["--advertise"])
        want = f"{w['metadata']['name']}-{i}.{headless[0]['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{grpc}"
        assert f["--advertise"] == want, f"node {i} advertises {f['--advertise']}, its stable name is {want}"
        assert "$(" not in f["--node-id"], f"unresolved reference in {f['--node-id']}"
    assert len(set(ids)) == n, f"node ids not distinct: {ids}"
    assert ids == [f"node-{i}" for i in range(n)], f"node ids do not follow the ordinal: {ids}"


def listening_port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def coordinators(objs) -> None:
    ws = [w for w, c in moe_containers(objs) if c["args"][0] == "coordinator"]
    assert len(ws) == 1 and ws[0]["kind"] == "Deployment"
    assert ws[0]["spec"]["replicas"] >= 2, f"coordinators: {ws[0]['spec']['replicas']}"


def pdbs(objs) -> None:
    budgets = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    for w in (o for o in objs if pod_spec(o)):
        comp = pod_labels(w)["app.kubernetes.io/component"]
        if comp == "router" and w["spec"].get("replicas", 2) < 2:
            continue  # a single router cannot have a budget that allows a drain
        assert any(selects(b["spec"]["selector"]["matchLabels"], pod_labels(w)) for b in budgets), \
            f"no PodDisruptionBudget for {w['metadata']['name']}"


def etcd_wiring(objs, values: dict[str, Any]) -> None:
    """Every role's --etcd names the members (or the external endpoints); members form one cluster."""
    members = [w for w, _ in etcd_containers(objs)]
    if not values.get("etcd", {}).get("enabled", True):
        assert not members, "etcd rendered although etcd.enabled is false"
        want = values["etcd"]["external"]["endpoints"]
    else:
        assert len(members) == 1 and members[0]["kind"] == "StatefulSet"
        w = members[0]
        n = w["spec"]["replicas"]
        assert n >= 3 and n % 2 == 1, f"etcd members: {n}"
        c = pod_spec(w)["containers"][0]
        initial = flag_values(c["args"])["--initial-cluster"].split(",")
        assert len(initial) == n
        want = []
        for i in range(n):
            f = flag_values([expand(a, pod_env(c, w, i)) for a in c["args"]])
            assert f"{f['--name']}={f['--initial-advertise-peer-urls']}" == initial[i]
            want.append(f["--advertise-client-urls"])
        assert w["spec"]["podManagementPolicy"] == "Parallel"
        flags = flag_values(c["args"])
        for f in ("--auto-compaction-mode", "--auto-compaction-retention", "--quota-backend-bytes"):
            assert f in flags, f"etcd without {f}"
        if values.get("etcd", {}).get("persistence", {}).get("enabled", True):
            assert w["spec"].get("volumeClaimTemplates"), "etcd without persistent volumes"
        budget = [b for b in objs if b["kind"] == "PodDisruptionBudget" and selects(b["spec"]["selector"]["matchLabels"], pod_labels(w))]
        assert budget and budget[0]["spec"]["minAvailable"] == n // 2 + 1, "etcd PDB keeps a majority"
    for w, c in moe_containers(objs):
        got = flag_values(c["args"])["--etcd"].split(",")
        assert got == want, f"{c['args'][0]} --etcd {got}, want {want}"


def production(objs) -> None:
    """The production-like values: GPUs, several nodes, 3-member etcd, 2+ routers, monitoring."""
    sts = next(w for w, c in moe_containers(objs) if c["args"][0] == "expert-node")
    assert sts["spec"]["replicas"] >= 4
    for w, c in moe_containers(objs):
        if c["args"][0] in ("expert-node", "router"):
            r = c["resources"]
            assert int(r["requests"].get("nvidia.com/gpu", 0)) >= 1, f"{c['args'][0]} requests no GPU"
            assert r["requests"]["nvidia.com/gpu"] == r["limits"]["nvidia.com/gpu"]
            assert pod_spec(w).get("nodeSelector") and pod_spec(w).get("tolerations")
    etcd = [w for w, _ in etcd_containers(objs)]
    assert etcd and etcd[0]["spec"]["replicas"] >= 3
    router = next(w for w, c in moe_containers(objs) if c["args"][0] == "router")
    hpa = [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    routers = hpa[0]["spec"]["minReplicas"] if hpa else router["spec"]["replicas"]
    assert routers >= 2, f"routers: {routers}"
    assert any(o["kind"] == "ServiceMonitor" for o in objs), "monitoring is on"
    assert any(o["kind"] == "NetworkPolicy" for o in objs)


def monitoring(objs) -> None:
    """ServiceMonitors select a Service with the scraped port; the PodMonitor a pod with it."""
    services = [o for o in objs if o["kind"] == "Service"]
    workloads = [o for o in objs if pod_spec(o)]
    comps = set()
    for m in (o for o in objs if o["kind"] == "ServiceMonitor"):
        sel = m["spec"]["selector"]["matchLabels"]
        ports = {p["port"] for p in m["spec"]["endpoints"]}
        hit = [s for s in services if selects(sel, s["metadata"]["labels"]) and ports & {p.get("name") for p in s["spec"]["ports"]}]
        assert hit, f"ServiceMonitor {m['metadata']['name']} scrapes no Service port {ports}"
        comps.add(sel["app.kubernetes.io/component"])
    for m in (o for o in objs if o["kind"] == "PodMonitor"):
        sel = m["spec"]["selector"]["matchLabels"]
        for e in m["spec"]["podMetricsEndpoints"]:
            hit = [w for w in workloads if selects(sel, pod_labels(w)) and any(port_in(c, e["port"]) for c in pod_spec(w)["containers"])]
            assert hit, f"PodMonitor {m['metadata']['name']} port {e['port']} is on no pod"
        comps.add(sel["app.kubernetes.io/component"])
    assert set(ROLES) <= comps, f"monitored roles: {sorted(comps)}"


def common(objs) -> None:
    """Recommended labels, no hard-coded namespace, hardened containers, the service account."""
    for o in objs:
        labels = o["metadata"].get("labels", {})
        what = f"{o['kind']}/{o['metadata']['name']}"
        for k in RECOMMENDED:
            if k == "component" and o["kind"] == "ServiceAccount":
                continue
            assert labels.get(f"app.kubernetes.io/{k}"), f"{what} lacks app.kubernetes.io/{k}"
        assert "namespace" not in o["metadata"], f"{what} sets a namespace"
        spec = pod_spec(o)
        if spec is None:
            continue
        assert spec["securityContext"].get("runAsNonRoot") is True, f"{what}: runAsNonRoot"
        assert spec.get("serviceAccountName"), f"{what}: no service account"
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{what}/{c['name']}: privilege escalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{what}/{c['name']}: capabilities"
            assert sc.get("readOnlyRootFilesystem") is True, f"{what}/{c['name']}: writable root"
            assert c.get("resources", {}).get("requests"), f"{what}/{c['name']}: no resource requests"
    for w, c in moe_containers(objs):
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["model"]["readOnly"] is True
        model = flag_values(c["args"])["--model"]
        assert model.startswith(mounts["model"]["mountPath"]), f"--model {model} outside the model mount"


def dashboards() -> None:
    """Each dashboards/*.json file becomes one labelled ConfigMap (a temporary copy of the chart
    gets one more dashboard, so the path is exercised even before the chart ships any)."""
    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / "moe-cluster"
        shutil.copytree(CHART, chart)
        (chart / "dashboards").mkdir(exist_ok=True)
        extra = {"title": "check", "panels": [], "schemaVersion": 39}
        (chart / "dashboards" / "zz_check.json").write_text(json.dumps(extra))
        files = sorted((chart / "dashboards").glob("*.json"))
        maps = [o for o in objects(render(chart, {})) if o["kind"] == "ConfigMap"]
        for f in files:
            hit = [m for m in maps if f.name in m.get("data", {})]
            assert len(hit) == 1, f"{f.name}: {len(hit)} ConfigMaps"
            assert hit[0]["metadata"]["labels"].get("grafana_dashboard") == "1"
            assert json.loads(hit[0]["data"][f.name]) == json.loads(f.read_text())
        off = objects(render(chart, {"dashboards": {"enabled": False}}))
        assert not [o for o in off if o["kind"] == "ConfigMap"]
    print(f"     {len(files) - 1} dashboard(s) in the chart")


def schema_rejects() -> None:
    cases = [
        ({"router": {"replica": 3}}, "additional properties 'replica' not allowed", "/router"),
        ({"expertNode": {"replicas": -1}}, "minimum", "/expertNode/replicas"),
        ({"coordinator": {"replicas": "two"}}, "got string, want integer", "/coordinator/replicas"),
        ({"etcd": {"replicas": 1}}, "minimum: got 1, want 3", "/etcd/replicas"),
        ({"routr": {}}, "additional properties 'routr' not allowed", ""),
    ]
    for values, reason, path in cases:
        try:
            render(CHART, values)
        except helm.HelmValuesError as e:
            msg = str(e)
            assert reason in msg and path in msg, f"{values}: unclear message {msg!r}"
            print(f"     {json.dumps(values)} -> {msg.strip().splitlines()[-1].strip()}")
            continue
        raise AssertionError(f"{values} rendered")
    try:
        render(CHART, {"etcd": {"replicas": 4}})
        raise AssertionError("4 etcd members rendered")
    except helm.HelmRenderError as e:
        assert "odd number of members" in str(e), f"unclear message {e}"


def values_commented() -> None:
    """Every leaf key of values.yaml has a comment right above it."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    for n, line in enumerate(lines):
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-") or ":" not in stripped:
            continue
        indent = len(line) - len(stripped)
        key = stripped.split(":", 1)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key]
        stack.append((indent, key))
        node, parent_leaf = schema, False
        for k in path:
            if parent_leaf or node is None:
                node = None
                break
            node = resolve(schema, node).get("properties", {}).get(k)
            parent_leaf = node is None or is_leaf(schema, node)
        if node is None:
            continue  # inside a free-form map (resources, securityContext, ...)
        if not is_leaf(schema, node):
            continue  # a group; its leaves carry the comments
        prev = lines[n - 1].strip() if n else ""
        assert prev.startswith("#"), f"values.yaml:{n + 1}: {'.'.join(path)} has no comment"


def network_policies(objs) -> None:
    """Only routers reach expert nodes' gRPC; only this release's pods reach etcd's client port."""
    pods = {pod_labels(w)["app.kubernetes.io/component"]: pod_labels(w) for w in objs if pod_spec(w)}
    policies = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in objs if o["kind"] == "NetworkPolicy"}

    def allowed(policy, port):
        rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == port for p in r.get("ports", []))]
        assert rules, f"{policy['metadata']['name']}: port {port} closed"
        peers = [p for r in rules for p in r.get("from", [None])]
        assert None not in peers, f"{policy['metadata']['name']}: port {port} open to anyone"
        return {c for c, labels in pods.items()
                if any(selects(p["podSelector"]["matchLabels"], labels) for p in peers if "podSelector" in p)}

    got = allowed(policies["expert-node"], "grpc")
    assert got == {"router"}, f"expert nodes' gRPC is open to {sorted(got)}"
    if "etcd" in pods:
        got = allowed(policies["etcd"], "client")
        assert got == set(pods), f"etcd's client port is open to {sorted(got)}, not every role"
        got = allowed(policies["etcd"], "peer")
        assert got == {"etcd"}, f"etcd's peer port is open to {sorted(got)}"


def notes_commands(values: dict[str, Any], moe: Path) -> None:
    """The `moe ...` command NOTES.txt tells users to run parses with this binary."""
    notes = next(v for k, v in render(CHART, values).items() if k.endswith("NOTES.txt"))
    cmds = [l.split(" -- moe ", 1)[1].split() for l in notes.splitlines() if " -- moe " in l]
    assert cmds, "NOTES.txt has no moe command"
    for c in cmds:
        k = next(i for i, a in enumerate(c) if a.startswith("--"))
        err = live.accepts(moe, c[:k], c[k:])
        assert err is None, f"NOTES.txt: moe {' '.join(c)}: {err}"


def app_version() -> None:
    import tomllib
    crate = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == crate, f"appVersion {chart['appVersion']}, crate {crate}"
    assert chart["apiVersion"] == "v2"


def no_monitoring(values: dict[str, Any]) -> None:
    kinds = [o["kind"] for o in objects(render(CHART, values)) if o["apiVersion"].startswith("monitoring.coreos.com")]
    assert not kinds, f"rendered {kinds} on a cluster without the monitoring.coreos.com API"


def require(cond: Any, msg: str) -> None:
    assert cond, msg


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    return schema["$defs"][node["$ref"].split("/")[-1]] if "$ref" in node else node


def is_leaf(schema: dict[str, Any], node: dict[str, Any]) -> bool:
    """A knob users set as one value: a scalar, a list, a free-form map, a resources or probe block."""
    return node.get("$ref") in ("#/$defs/resources", "#/$defs/probe") or not resolve(schema, node).get("properties")


def dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "--locked" in text and "cargo build --release" in text
    assert 'ENTRYPOINT ["moe"]' in text
    users = [l.split()[1] for l in text.splitlines() if l.startswith("USER ")]
    assert users and not users[-1].startswith(("0", "root")), f"USER {users}"
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, f"hadolint:\n{out.stdout}{out.stderr}"


def main() -> int:
    moe = Path(sys.argv[1]).resolve()
    helps = {r: live.Help(moe, r) for r in ROLES}
    sets = value_sets()
    rendered: dict[str, list[dict[str, Any]]] = {}
    for name, values in sets.items():
        check(f"{name}: helm lint --strict", lambda v=values: lint(v))
        objs = objects(render(CHART, values, MONITORING_APIS))
        rendered[name] = objs
        print(f"     {name}: {len(objs)} objects")
        check(f"{name}: kubernetes-validate --strict {KUBE_VERSIONS}", lambda o=objs: kube_validate(o))
        check(f"{name}: container args are `moe <role> --help` flags clap accepts", lambda o=objs: args_are_flags(o, moe, helps))
        check(f"{name}: Service targetPorts are containerPorts", lambda o=objs: services_target_pods(o))
        check(f"{name}: expert nodes: distinct ordinal ids, stable advertised names", lambda o=objs: expert_nodes(o))
        check(f"{name}: coordinators >= 2", lambda o=objs: coordinators(o))
        check(f"{name}: disruption budgets", lambda o=objs: pdbs(o))
        check(f"{name}: etcd members and --etcd endpoints", lambda o=objs, v=values: etcd_wiring(o, v))
        check(f"{name}: labels, namespaces, security contexts", lambda o=objs: common(o))
        if values.get("metrics", {}).get("serviceMonitor", {}).get("enabled"):
            check(f"{name}: ServiceMonitors/PodMonitors scrape every role", lambda o=objs: monitoring(o))
        check(f"{name}: no monitoring objects without the CRD API", lambda v=values: no_monitoring(v))
        if values.get("networkPolicy", {}).get("enabled"):
            check(f"{name}: NetworkPolicies: routers -> expert nodes, release pods -> etcd", lambda o=objs: network_policies(o))
        check(f"{name}: NOTES.txt's moe command parses", lambda v=values: notes_commands(v, moe))
    prod = [n for n in rendered if "production" in n]
    check("a production-like values file exists", lambda: require(prod, "no ci/*production*-values.yaml"))
    for name in prod:
        check(f"{name}: GPUs, 3-member etcd, 2+ routers, monitoring", lambda o=rendered[name]: production(o))
    check("dashboards/*.json become grafana_dashboard ConfigMaps", dashboards)
    check("schema rejects unknown keys, negative counts, wrong types", schema_rejects)
    check("every values.yaml knob is commented", values_commented)
    check("Dockerfile: --locked, non-root, hadolint", dockerfile)
    check("Chart.yaml: apiVersion v2, appVersion = the crate version", app_version)
    cluster = live.Cluster(moe, MODEL)
    try:
        for name, objs in rendered.items():
            check(f"{name}: probes hit paths and ports the running binaries serve", lambda o=objs: probes_served(o, cluster))
    finally:
        cluster.stop()
    if failures:
        print(f"\n{len(failures)} check(s) failed:\n" + "\n".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
