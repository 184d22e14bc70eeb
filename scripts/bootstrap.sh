#!/usr/bin/env bash
# Installs everything the testbed needs: system packages (apt) and a Python
# virtual environment with pinned dependencies. Idempotent: a stamp holding the
# hash of the package lists makes a second run a no-op.
# Works as root on Debian 12, Ubuntu 24.04 and inside the project's VM.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${MPTB_VENV:-$here/.venv}
stamp=$venv/.bootstrap-stamp
want=$(cat "$here/scripts/apt-packages.txt" "$here/requirements.txt" "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)

if [ "$(id -u)" != 0 ]; then
  echo "bootstrap: must run as root (network namespaces, tc and nftables need it)" >&2
  exit 1
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/invoke" ]; then
  exit 0
fi

pkgs=$(grep -v '^\s*#' "$here/scripts/apt-packages.txt" | xargs)
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "bootstrap: installing system packages:$missing" >&2
  export DEBIAN_FRONTEND=noninteractive
  # tshark asks whether non-root users may capture; answer once, non-interactively.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  # mptcpd's system service would manage the machine's own MPTCP endpoints; the
  # testbed starts mptcpd only inside a host's namespace. Masked before the
  # package can enable and start it (only where systemd runs and nothing is there yet).
  case " $missing " in *" mptcpd "*)
    if [ -d /run/systemd/system ] && [ ! -e /etc/systemd/system/mptcp.service ]; then
      ln -s /dev/null /etc/systemd/system/mptcp.service
    fi;;
  esac
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The distribution's python3 is the one Mininet's module is built for, so the
# venv uses it and sees its site-packages (mininet) underneath our pins.
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
# pipefail keeps pip's exit status; the filter only hides a harmless index warning.
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt" 2>&1 \
  | { grep -v "^WARNING: Location" >&2 || true; }
# (the editable install's build backend warns loudly about nothing we control)
PYTHONWARNINGS=ignore "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$here" 2>&1 \
  | { grep -v "^WARNING: Location" >&2 || true; }
echo "$want" > "$stamp"
echo "bootstrap: ready ($venv)" >&2
