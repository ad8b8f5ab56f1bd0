#!/usr/bin/env bash
# Everything a fresh Debian machine needs to run MeshHealth's tests:
# Mosquitto (the tests start their own on a free loopback port), Chromium
# (the page tests drive it headless through Playwright; Playwright's own
# browser download is never used) and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    missing+=(mosquitto mosquitto-clients)
fi
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)                # deploy/certs.sh
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)        # checks deploy/systemd
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
