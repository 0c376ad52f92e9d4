#!/usr/bin/env bash
# capsh (Debian's libcap2-bin) for the read-only fault tests (tests/faults/helpers.py `as_user`): root ignores file
# permissions, so as root those tests run `music` with CAP_DAC_OVERRIDE dropped through capsh.
set -euo pipefail
if command -v capsh >/dev/null || [ -x /sbin/capsh ] || [ -x /usr/sbin/capsh ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends libcap2-bin >/dev/null
command -v capsh || ls /sbin/capsh /usr/sbin/capsh
