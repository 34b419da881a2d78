#!/usr/bin/env bash
# Brings up the whole system on embedded defaults (Debian 12, Node 20, as root): installs the
# system packages (PostgreSQL, Redis, OpenStack Swift for S3) and npm dependencies when missing,
# builds the web page, then `t2i demo`: throwaway services in a temp folder, the oracle model, the
# API on :8000 and a worker; it submits a prompt, shows its progress, prints the image URL, then
# the page's address and the key to paste into it, and runs until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
# The web page the API serves at / (Vite, into dist/web; about a second).
npm run build:web --silent
exec node bin/t2i.js demo "$@"
