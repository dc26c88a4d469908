#!/usr/bin/env bash
# Install Debian's Prometheus server, once, for the test that has a real Prometheus scrape
# omnistage's /metrics (tests/integration/test_prometheus.py; about 20 s with apt-get). Nothing
# here is fatal: without apt-get, or where it fails, that test skips and says why.
set -uo pipefail

if command -v prometheus >/dev/null 2>&1; then
  echo "prometheus: present ($(prometheus --version 2>&1 | head -n1))"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus: no apt-get; install Prometheus yourself (its test skips without it)"
  exit 0
fi
echo "prometheus: installing Debian's prometheus with apt-get"
sudo=()
[[ $(id -u) -ne 0 ]] && sudo=(sudo -n)
# The package's service is never started (there is no init here); the test runs its own.
if ! { "${sudo[@]}" apt-get update -qq \
  && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null; }; then
  echo "prometheus: apt-get could not install it (its test will skip)"
fi
exit 0
