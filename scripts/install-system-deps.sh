#!/usr/bin/env bash
# Installs the system programs that the t2i tests, CI and demo run as real
# throwaway services (see src/dev/services.ts): PostgreSQL 15, Redis,
# OpenStack Swift with its S3 API (the local S3 that checks SigV4 signatures),
# Prometheus, binutils (readelf, for the shared-library check's test) and
# Chromium (the web page's browser tests).
#
# Idempotent and fast when everything is present: apt-get runs (update first)
# only when something is missing. It never starts system services: the
# harness starts its own instances on free loopback ports.
#
# Usage: bash scripts/install-system-deps.sh      (as root, Debian 12)
set -euo pipefail

log() { printf '[install-system-deps] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo -E bash "$0" "$@"
  fi
  log "must run as root (apt-get install); re-run as root or with sudo" >&2
  exit 1
fi

# package -> a check that is true when what we need from it is present.
# Checked by function rather than `dpkg -s` alone so that a half-removed
# package (config files only) still counts as missing.
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
want() { # want PACKAGE CHECK-COMMAND...
  local pkg=$1; shift
  if ! have_pkg "$pkg" || ! "$@" >/dev/null 2>&1; then missing+=("$pkg"); fi
}

want postgresql-15 test -x /usr/lib/postgresql/15/bin/initdb
want redis-server  command -v redis-server
want redis-tools   command -v redis-cli
# Swift's S3 API lives in the swift package itself (swift.common.middleware.s3api
# since Swift 2.23; Debian 12 ships 2.30), so the four server packages suffice.
# Debian's python (the swift servers' shebang), not a pyenv/venv python3 on PATH.
want swift         /usr/bin/python3 -c 'import swift.common.middleware.s3api'
want swift-proxy   command -v swift-proxy-server
want swift-object  command -v swift-object-server
want swift-container command -v swift-container-server
want swift-account command -v swift-account-server
# memcached: the local Swift's cache (src/dev/services/swift.ts).
want memcached     command -v memcached
want prometheus    command -v prometheus
# ip netns and veth pairs for the partition test (tests/reliability/partition.test.ts).
want iproute2      command -v ip
# readelf: tests/integration/native-libs.test.ts checks t2i check-libs against it (ldd is in libc-bin).
want binutils      command -v readelf
# The web page's tests drive Debian's Chromium with playwright-core (tests/integration/web-page.test.ts):
# Playwright's own browser downloads cannot work offline.
want chromium      test -x /usr/bin/chromium

if [ ${#missing[@]} -eq 0 ]; then
  log "all present: postgresql-15 redis-server swift(-proxy/-object/-container/-account) prometheus binutils chromium"
  exit 0
fi

log "missing: ${missing[*]}"

# Keep maintainer scripts from starting system services (postgres on 5432,
# redis on 6379, swift, prometheus on 9090 would clash with nothing of ours but
# waste memory and ports). Docker images already ship a policy-rc.d that
# returns 101; if there is none, put one in place only for this run.
created_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\n# temporary, from t2i scripts/install-system-deps.sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  created_policy=1
fi
cleanup() { if [ -n "$created_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  "${missing[@]}"
log "installed: ${missing[*]} ($(( $(date +%s) - start )) s)"

# Belt and braces: if a package started its service anyway (no systemd here,
# but a machine with one would ignore policy-rc.d for socket units), stop it.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  for unit in redis-server prometheus postgresql swift-proxy swift-object \
              swift-container swift-account; do
    systemctl disable --now "$unit" >/dev/null 2>&1 || true
  done
fi

/usr/bin/python3 -c 'import swift.common.middleware.s3api' \
  || { log "swift installed but its s3api middleware does not import" >&2; exit 1; }
log "done"
