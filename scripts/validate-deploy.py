#!/usr/bin/env python3
"""Checks deploy/ without a container engine or a cluster (run by scripts/validate-deploy.sh).

- Kubernetes manifests against the Kubernetes OpenAPI schemas (kubernetes-validate, strict);
  KEDA objects against deploy/schemas/keda.schema.json; docker-compose.yml against the Compose
  specification (check-jsonschema's vendored compose-spec).
- Kustomizations: every resource and generated file exists.
- Alert rules and the Grafana dashboard: well formed, and every imagegen_* metric they use is one
  that src/worker/metrics.rs exports; every alert has a runbook section in docs/operations.md.
- The Dockerfile builds with `make build`, and the Makefile's build is `cargo build --release --locked`.
"""
import json
import pathlib
import re
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = pathlib.Path(sys.executable).parent
errors = []


def fail(message):
    errors.append(message)
    print(f"FAIL {message}")


def run(args):
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"{' '.join(map(str, args))}:\n{result.stdout}{result.stderr}")
    return result


# Metric names exported by the worker (one module owns them).
metrics_rs = (ROOT / "src/worker/metrics.rs").read_text()
exported = set(re.findall(r'"(imagegen_[a-z_]+)"', metrics_rs))
histograms = {m for m in exported if m.endswith("_seconds")}
known = exported | {f"{h}_{s}" for h in histograms for s in ("bucket", "sum", "count")}


def check_metric_names(where, text):
    for name in set(re.findall(r"\b(imagegen_[a-z_]+)", text)):
        if name not in known:
            fail(f"{where}: metric {name} is not exported by src/worker/metrics.rs")


# Kubernetes: core kinds with kubernetes-validate, KEDA kinds with our schema.
keda_schema = json.loads((DEPLOY / "schemas/keda.schema.json").read_text())
manifests = sorted(p for p in (DEPLOY / "k8s").rglob("*.yaml") if p.name != "kustomization.yaml")
run([BIN / "kubernetes-validate", "-k", "1.31.0", "--strict", *map(str, manifests)])
try:
    import jsonschema
except ImportError:
    jsonschema = None
for path in manifests:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("apiVersion", "").startswith("keda.sh/"):
            for e in jsonschema.Draft202012Validator(keda_schema).iter_errors(doc):
                fail(f"{path.relative_to(ROOT)}: {doc['kind']}: {e.message} at {list(e.path)}")
            print(f"ok {path.relative_to(ROOT)} {doc['kind']} (KEDA schema)")

for kustomization in sorted((DEPLOY / "k8s").rglob("kustomization.yaml")):
    k = yaml.safe_load(kustomization.read_text())
    base = kustomization.parent
    refs = list(k.get("resources", []))
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        refs += [f.split("=", 1)[-1] for f in gen.get("files", [])]
    for ref in refs:
        if not (base / ref).exists():
            fail(f"{kustomization.relative_to(ROOT)}: {ref} does not exist")
    print(f"ok {kustomization.relative_to(ROOT)} ({len(refs)} references)")

# The Deployment's grace outlives the worker's drain.
deployment = yaml.safe_load((DEPLOY / "k8s/base/deployment.yaml").read_text())
production = (DEPLOY / "k8s/base/production.toml").read_text()
grace = int(re.search(r"shutdown_grace_secs\s*=\s*(\d+)", production).group(1))
period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
if period <= grace:
    fail(f"terminationGracePeriodSeconds ({period}) must exceed worker.shutdown_grace_secs ({grace})")

# Compose.
run([BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "docker-compose.yml")])

# Alerts.
operations = (ROOT / "docs/operations.md").read_text().lower()
rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())
for group in rules["groups"]:
    for rule in group["rules"]:
        for field in ("alert", "expr"):
            if field not in rule:
                fail(f"alerts.yaml: a rule has no {field}")
        if "severity" not in rule.get("labels", {}) or "summary" not in rule.get("annotations", {}):
            fail(f"alerts.yaml: {rule.get('alert')} needs labels.severity and annotations.summary")
        if f"### {rule['alert']}".lower() not in operations:
            fail(f"alerts.yaml: {rule['alert']} has no section in docs/operations.md")
        check_metric_names(f"alerts.yaml {rule['alert']}", rule["expr"])
print(f"ok deploy/prometheus/alerts.yaml ({sum(len(g['rules']) for g in rules['groups'])} rules)")

# Dashboard.
dashboard = json.loads((DEPLOY / "grafana/imagegen-dashboard.json").read_text())
ids = [p["id"] for p in dashboard["panels"]]
if len(ids) != len(set(ids)):
    fail("dashboard: duplicate panel ids")
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        check_metric_names(f"dashboard panel {panel['title']!r}", target["expr"])
print(f"ok deploy/grafana/imagegen-dashboard.json ({len(ids)} panels)")

# Dockerfile and CI build the same way.
dockerfile = (DEPLOY / "Dockerfile").read_text()
makefile = (ROOT / "Makefile").read_text()
if "RUN make build" not in dockerfile:
    fail("deploy/Dockerfile must build with `make build`")
if not re.search(r"^build:.*\n\t\$\(CARGO\) build --release --locked --bin imagegen", makefile, re.M):
    fail("Makefile: `build` must be `cargo build --release --locked --bin imagegen`")

if errors:
    print(f"{len(errors)} problem(s) in deploy/")
    sys.exit(1)
print("deploy/ is valid")
