#!/usr/bin/env bash
# fetch_onnxruntime_headers.sh DEST: onnxruntime's C/C++ API headers from Debian trixie's
# libonnxruntime-dev, downloaded with a private apt configuration (DEST/apt) and unpacked
# with dpkg -x into DEST (headers in DEST/usr/include/onnxruntime). Nothing is installed.
# On failure: exit 1 with one line on stderr saying why.
set -euo pipefail
DEST="$1"
APT="$DEST/apt"
command -v apt-get >/dev/null && command -v dpkg >/dev/null \
    || { echo "apt-get/dpkg not found, so libonnxruntime-dev cannot be fetched" >&2; exit 1; }
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
echo "deb http://deb.debian.org/debian trixie main" > "$APT/sources.list"
opts=(-o "Dir::Etc::SourceList=$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o APT::Sandbox::User=root)
fail() { echo "downloading libonnxruntime-dev from Debian trixie failed (network?); see $APT/log" >&2; exit 1; }
apt-get "${opts[@]}" -qq update >"$APT/log" 2>&1 || fail
(cd "$APT" && rm -f libonnxruntime-dev_*.deb && apt-get "${opts[@]}" -qq download libonnxruntime-dev) >>"$APT/log" 2>&1 || fail
dpkg -x "$APT"/libonnxruntime-dev_*.deb "$DEST" && [ -f "$DEST/usr/include/onnxruntime/onnxruntime_lite_custom_op.h" ] \
    || { echo "libonnxruntime-dev unpacked, but it has no usr/include/onnxruntime/onnxruntime_lite_custom_op.h" >&2; exit 1; }
rm -rf "$APT/lists" "$APT/cache"  # 20 MB of package lists, not needed once unpacked
