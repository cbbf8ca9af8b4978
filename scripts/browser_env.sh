#!/usr/bin/env bash
# Headless Chromium for the report's browser tests (tests/integration/test_report_browser.py).
#   bash scripts/browser_env.sh        # `make test` runs it first
# Uses a Chromium already on PATH (or $HUMPBACK_CHROMIUM); else installs Debian's `chromium`
# package when apt-get can run as root (CI containers). Anywhere else it says so and the browser
# tests skip with that reason; it never fails the build.
set -u
for name in "${HUMPBACK_CHROMIUM:-}" chromium chromium-browser google-chrome; do
  if [ -n "$name" ] && command -v "$name" >/dev/null 2>&1; then
    echo "browser tests: using $(command -v "$name")"
    exit 0
  fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "browser tests: installing Debian's chromium (apt-get)"
  if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >/tmp/humpback-chromium-install.log 2>&1; then
    echo "browser tests: installed $(command -v chromium)"
    exit 0
  fi
  echo "browser tests: apt-get install chromium failed (see /tmp/humpback-chromium-install.log); they will skip"
  exit 0
fi
echo "browser tests: no Chromium and no root apt-get here; they will skip (install chromium to run them)"
