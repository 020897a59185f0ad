#!/usr/bin/env bash
# Render a report.html in headless Chromium, offline, and save a screenshot to look at.
# Every host name resolves to nothing (--host-resolver-rules), so a report that needed the
# network would show broken images. Needs Debian's chromium: apt-get install -y chromium
#
# Usage: bash benchmarks/report_screenshot.sh runs/x/report.html [out.png]
set -euo pipefail
html=$(realpath "$1")
out=$(realpath -m "${2:-${html%.html}.png}")
command -v chromium >/dev/null || { echo "chromium not found: apt-get install -y chromium" >&2; exit 2; }
grep -qE 'https?:' "$html" && { echo "$html references the network (http/https)" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
  --host-resolver-rules="MAP * ~NOTFOUND" --hide-scrollbars \
  --screenshot="$out" --window-size=1200,3000 "file://$html" 2>/dev/null
test -s "$out"
echo "screenshot: $out"
