#!/usr/bin/env bash
# Validates deploy/ (see scripts/validate-deploy.py) in a virtualenv of its own, created on first
# use from PyPI at pinned versions: kubernetes-validate, check-jsonschema, PyYAML, jsonschema.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-deploy"
if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/check-jsonschema" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        'kubernetes-validate==1.31.0' 'check-jsonschema==0.39.0' 'PyYAML==6.0.4' 'jsonschema==4.26.0'
fi
exec "$VENV/bin/python" "$ROOT/scripts/validate-deploy.py"
