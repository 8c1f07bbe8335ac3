#!/usr/bin/env bash
# Idempotent set-up: Debian packages, the libvirt-qemu user, and the virtualenv at .venv.
# A second run with nothing changed takes a second or two.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

log() { printf 'bootstrap: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "run as root (packages, network namespaces and loop devices need it)"
    exit 1
fi

# 1. Debian packages: install only what is missing.
mapfile -t wanted < <(grep -v '^\s*#' scripts/debian-packages.txt | awk 'NF {print $1}')
missing=()
for pkg in "${wanted[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# 2. libvirt's embedded QEMU driver wants this system user to exist.
if ! getent passwd libvirt-qemu >/dev/null; then
    log "creating system user libvirt-qemu"
    useradd -r -s /usr/sbin/nologin libvirt-qemu
fi

# 3. The virtualenv, reinstalled only when pyproject.toml changes.
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    log "$python is older than 3.11; set PYTHON=python3.11"
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $python"
    "$python" -m venv .venv
fi
stamp=.venv/.meshcloud-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing meshcloud and its dependencies into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    echo "$want" > "$stamp"
fi
# Bytecode for meshcloud itself (the editable install has none until first use, and
# none at all where PYTHONDONTWRITEBYTECODE is set): a lab starts every rack's daemon
# at once, and each would compile the modules again, about 0.2 s of CPU per start.
.venv/bin/python -m compileall -q -j 0 meshcloud > /dev/null
log "ready"
