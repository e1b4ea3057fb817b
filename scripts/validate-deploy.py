#!/usr/bin/env python3
"""Checks deploy/ without a container engine or a cluster (run by scripts/validate-deploy.sh).

- Kubernetes manifests against the Kubernetes OpenAPI schemas (kubernetes-validate, strict);
  KEDA objects against deploy/schemas/keda.schema.json; docker-compose.yml against the Compose
  specification (check-jsonschema's vendored compose-spec).
- Kustomizations: every resource and generated file exists.
- Alert rules and the Grafana dashboard: well formed, and every imagegen_* metric they use is one
  that src/worker/metrics.rs exports; every alert has a runbook section in docs/operations.md.
- The Dockerfile builds with `make build`, and the Makefile's build is `cargo build --release --locked`.
- Every image reference (compose `image:`, Kubernetes containers after the kustomizations' `images`
  rewrites, Dockerfile `FROM`) is pinned: it has a tag or a digest, the tag is not `latest` nor
  major-only (`4-management`, `rust:1-bookworm`), a tag without any version (`nonroot`,
  `management`) comes with a digest, and the project's own images (imagegen, imagegen-fakes) carry
  the crate's version from Cargo.toml.
"""
import json
import pathlib
import re
import subprocess
import sys
import tomllib

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

# Images: pinned to a release (or a digest), never floating.
CRATE_VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
OWN_IMAGES = {"imagegen", "imagegen-fakes"}
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# A tag whose version is a major number alone: `4`, `v2`, `4-management`, `1-bookworm`.
MAJOR_ONLY = re.compile(r"v?\d{1,3}(?:[-_][A-Za-z].*)?")


def split_image(ref):
    """(repository, tag or None, digest or None) of an image reference."""
    name, _, digest = ref.partition("@")
    head, slash, last = name.rpartition("/")
    repo_last, colon, tag = last.partition(":")
    return head + slash + repo_last, (tag if colon else None), (digest or None)


def image_problem(ref):
    repo, tag, digest = split_image(ref)
    if digest is not None and not DIGEST.fullmatch(digest):
        return f"malformed digest {digest!r}"
    if tag is None and digest is None:
        return "no tag: it means `latest`"
    if tag == "latest":
        return "`latest` is not a version"
    if repo.rsplit("/", 1)[-1] in OWN_IMAGES:
        if tag is not None and tag != CRATE_VERSION:
            return f"the project's image must carry the crate's version {CRATE_VERSION} (Cargo.toml)"
        return None
    if digest is None and MAJOR_ONLY.fullmatch(tag):
        return "a major-only tag follows every release of that major: pin a full version"
    if digest is None and not re.search(r"\d", tag):
        return "a tag without a version is moved by every release: pin a version or a digest"
    return None


def check_images(where, refs):
    problems = [(ref, image_problem(ref)) for ref in refs]
    for ref, problem in problems:
        if problem:
            fail(f"{where}: image {ref}: {problem}")
    if not any(problem for _, problem in problems):
        print(f"ok {where} ({len(refs)} image(s) pinned)")


compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
check_images(
    "deploy/docker-compose.yml",
    [svc["image"] for svc in compose.get("services", {}).values() if "image" in svc],
)

# Kubernetes: the kustomizations' `images` entries rewrite the containers' images by name.
rewrites = {}
for kustomization in sorted((DEPLOY / "k8s").rglob("kustomization.yaml")):
    for entry in yaml.safe_load(kustomization.read_text()).get("images", []):
        rewrites[entry["name"]] = entry


def container_images(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers", "ephemeralContainers") and isinstance(value, list):
                yield from (c["image"] for c in value if isinstance(c, dict) and "image" in c)
            else:
                yield from container_images(value)
    elif isinstance(node, list):
        for item in node:
            yield from container_images(item)


def rewritten(ref):
    repo, tag, digest = split_image(ref)
    entry = rewrites.get(repo)
    if entry is None:
        return ref
    repo = entry.get("newName", repo)
    tag = str(entry["newTag"]) if "newTag" in entry else tag
    digest = entry.get("digest", digest)
    return repo + (f":{tag}" if tag is not None else "") + (f"@{digest}" if digest else "")


k8s_refs = []
for path in manifests:
    for doc in yaml.safe_load_all(path.read_text()):
        k8s_refs += [rewritten(ref) for ref in container_images(doc)]
check_images("deploy/k8s", k8s_refs)

# Dockerfile: every FROM that is not an earlier stage, with the ARGs declared before the first FROM.
args, stages, from_refs, in_stage = {}, {"scratch"}, [], False
for line in (DEPLOY / "Dockerfile").read_text().splitlines():
    words = line.split()
    if not words or words[0].startswith("#"):
        continue
    if words[0].upper() == "ARG" and not in_stage:
        name, _, value = " ".join(words[1:]).partition("=")
        if value.strip().strip('"'):
            args[name.strip()] = value.strip().strip('"')
    elif words[0].upper() == "FROM":
        in_stage = True
        words = [w for w in words[1:] if not w.startswith("--")]
        ref = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), words[0])
        if "$" in ref:
            fail(f"deploy/Dockerfile: FROM {words[0]}: needs an ARG with a default value before the first FROM")
        elif ref.lower() not in stages:
            from_refs.append(ref)
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2].lower())
check_images("deploy/Dockerfile", from_refs)

if errors:
    print(f"{len(errors)} problem(s) in deploy/")
    sys.exit(1)
print("deploy/ is valid")
