#!/bin/sh
# Install nbdserve into a virtualenv on Debian's python3 (default /opt/nbdserve) and link
# /usr/local/bin/nbdserve. Run as root on Debian 12; safe to run again to upgrade.
set -eu
cd "$(dirname "$0")"
prefix=${NBDSERVE_PREFIX:-/opt/nbdserve}

if ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
# System site packages: Debian's python3-libnbd (and python3-rbd) become importable.
/usr/bin/python3 -m venv --system-site-packages "$prefix"
"$prefix/bin/pip" install --quiet --disable-pip-version-check --upgrade "$@" .
ln -sf "$prefix/bin/nbdserve" /usr/local/bin/nbdserve
echo "installed: $(/usr/local/bin/nbdserve --version) in $prefix"
