#!/usr/bin/env bash
# The Debian packages the tests drive, each installed only when missing:
# - chromium for the browser tests (tests/e2e): Playwright for Python drives it through
#   executable_path=/usr/bin/chromium. Never `playwright install` (it downloads its own browsers).
# - capsh (libcap2-bin) for the read-only fault tests (tests/faults/helpers.py `as_user`): root ignores file
#   permissions, so as root those tests run `music` with CAP_DAC_OVERRIDE dropped through capsh.
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v capsh >/dev/null || [ -x /sbin/capsh ] || [ -x /usr/sbin/capsh ] || missing+=(libcap2-bin)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
/usr/bin/chromium --version
command -v capsh || ls /sbin/capsh /usr/sbin/capsh
