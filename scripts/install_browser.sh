#!/usr/bin/env bash
# Debian's chromium for the browser tests (tests/e2e): Playwright for Python drives it through
# executable_path=/usr/bin/chromium. Never `playwright install` (it downloads its own browsers).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
/usr/bin/chromium --version
