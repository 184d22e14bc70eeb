#!/bin/sh
# Installs Debian's trixie-backports kernel on Debian 12 (bookworm), as root.
# Used by the offline box builder (in its chroot) and by the Vagrantfile's
# provisioning of the upstream box: one recipe for both.
#
# Why: the testbed pins per-namespace MPTCP sysctls that need Linux >= 6.15
# (path_manager, available_path_managers). bookworm's 6.1 and
# bookworm-backports' 6.12 lack them; trixie-backports' kernel has them and
# installs on bookworm with linux-base from the same suite. That linux-base puts
# hooks under /usr/share/kernel/*.d, and the kernel's hook runner then hands
# run-parts two directories, which bookworm's run-parts (debianutils < 5.21)
# rejects; so those hooks are diverted to /etc/kernel/*.d (one directory).
set -eu
if dpkg-query -W -f='${Version}' linux-image-amd64 2>/dev/null | grep -q 'bpo13'; then
  exit 0
fi
mirror=${MPTB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
export DEBIAN_FRONTEND=noninteractive
list=/etc/apt/sources.list.d/mptcp-testbed-kernel.list
printf 'deb %s trixie-backports main\n' "$mirror" > "$list"
apt-get update -qq
# initramfs-tools first, or the kernel picks dracut (its first alternative).
apt-get install -y -qq --no-install-recommends initramfs-tools >/dev/null
apt-get install -y -qq --no-install-recommends -t trixie-backports linux-base >/dev/null
for f in /usr/share/kernel/*.d/*; do
  [ -e "$f" ] || continue
  kind=$(basename "$(dirname "$f")")
  mkdir -p "/etc/kernel/$kind"
  dpkg-divert --local --rename --divert "/etc/kernel/$kind/$(basename "$f")" --add "$f" >/dev/null
done
rmdir /usr/share/kernel/*.d 2>/dev/null || true
apt-get install -y -qq --no-install-recommends -t trixie-backports linux-image-amd64 >/dev/null
echo "guest_kernel: installed $(dpkg-query -W -f='${Version}' linux-image-amd64)" >&2
