#!/usr/bin/env bash
# Runs every test with real services, from a fresh clone on Debian 12 with Node 20 (as root):
# installs the system packages the tests start (Redis, OpenStack Swift, Prometheus, Chromium;
# PostgreSQL 15), installs the npm dependencies, then runs vitest. The tests start and stop their own
# throwaway servers on 127.0.0.1. Before the tests, the checks: typecheck (src and tests),
# type-aware lint and formatting, import cycles, dead code and unused dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
npm ci --no-audit --no-fund
npm run check
# The web page as the API serves it (dist/web): proves the production build works. The browser
# test builds its own copy from the same sources, so it never tests a stale one.
npm run build:web
npm test
