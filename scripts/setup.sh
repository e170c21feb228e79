#!/usr/bin/env bash
# Set up obdconv on a fresh Debian 12 machine: system packages + a virtualenv in .venv.
# Idempotent and quiet on success; on failure it says which step failed and shows its log.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG="$(mktemp -t obdconv-setup.XXXXXX)"
trap 'rm -f "$LOG"' EXIT

fail() { echo "setup: $1 failed; its output:" >&2; tail -n 40 "$LOG" >&2; exit 1; }

APT_PACKAGES=(
  e2fsprogs libext2fs2 redis-server mariadb-server docker-registry skopeo umoci
  apache2-utils openssl debootstrap chromium zstd pigz python3-venv ca-certificates util-linux
  liblz4-1 zlib1g
  faketime iproute2 curl  # tests/multihost: a worker host with its clock off; network namespaces; readiness checks
  libext2fs-dev gcc libc6-dev  # build the ext4 C fast path (obdconv/ext4/_build_fast.py) at pip install
  prometheus  # promtool checks deploy/prometheus/ (the server itself is not used)
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >"$LOG" 2>&1 || fail "apt-get update"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >"$LOG" 2>&1 || fail "apt-get install ${missing[*]}"
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv >"$LOG" 2>&1 || fail "python3 -m venv .venv"
fi
stamp=".venv/.obdconv-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ obdconv/ext4/_fastapply_impl.c -nt "$stamp" ] || [ obdconv/ext4/_build_fast.py -nt "$stamp" ] \
   || [ obdconv/oci/_tarscan_fast_impl.c -nt "$stamp" ] || [ obdconv/oci/_build_tarscan.py -nt "$stamp" ] \
   || [ obdconv/formats/_fast_impl.c -nt "$stamp" ] || [ obdconv/formats/_build_fast.py -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -U pip >"$LOG" 2>&1 || fail "pip upgrade"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' >"$LOG" 2>&1 || fail "pip install -e .[test]"
  touch "$stamp"
fi
