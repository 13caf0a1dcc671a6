#!/usr/bin/env bash
# One entry point for a fresh clone: ./dev.sh demo | test | lint | shell
# Creates .venv with the project and its dev extra on first use (and again
# whenever pyproject.toml changes); needs only python3 (>= 3.11) and pip.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.installed"
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
        echo "$want" > "$stamp"
    fi
}

lint() {
    local dirs=(sds tests proto)
    for optional in bench examples; do
        [ -d "$optional" ] && dirs+=("$optional")
    done
    "$VENV/bin/ruff" check "${dirs[@]}"
    "$VENV/bin/ruff" format --check "${dirs[@]}"
    "$VENV/bin/mypy"
}

cmd=${1:-help}
shift || true
case "$cmd" in
    demo)
        ensure_venv
        exec "$VENV/bin/sds" demo "$@"
        ;;
    test)
        ensure_venv
        lint
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    lint)
        ensure_venv
        lint
        ;;
    shell)
        ensure_venv
        exec bash --rcfile <(echo "source $VENV/bin/activate")
        ;;
    *)
        echo "usage: ./dev.sh demo|test|lint|shell [args]" >&2
        exit 2
        ;;
esac
