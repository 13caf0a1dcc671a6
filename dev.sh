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
        # Some distributions ship Python without ensurepip/venv; virtualenv from PyPI works there.
        "$PY" -m venv "$VENV" 2>/dev/null || {
            rm -rf "$VENV"
            "$PY" -m pip install --quiet --user virtualenv
            "$PY" -m virtualenv --quiet "$VENV"
        }
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

# The tests use real TLS peers (openssl, curl) and run clients as other uids (setpriv).
ensure_test_tools() {
    local missing=()
    command -v openssl >/dev/null || missing+=(openssl)
    command -v curl >/dev/null || missing+=(curl)
    command -v setpriv >/dev/null || missing+=(util-linux)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "dev.sh: the tests need: ${missing[*]}; install them and run again" >&2
        exit 1
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
        ensure_test_tools
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
