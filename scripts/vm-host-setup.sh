#!/usr/bin/env bash
# Host side of the Vagrant path (Linux hosts with the libvirt provider):
# installs Vagrant, vagrant-libvirt, libvirt, qemu and debootstrap from the
# distribution, then makes sure libvirt is running. Idempotent.
#
# Why the hand-holding: on machines without systemd (containers, light VMs,
# CI) nothing starts virtlogd/libvirtd, and a /dev/kvm that only root may open
# makes every libvirt capability probe time out (~8 s each, `vagrant up` ~3 min).
# VirtualBox users on laptops do not need this script: install Vagrant and
# VirtualBox from their vendors and run `vagrant up`.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "vm-host-setup: must run as root (installs packages, starts libvirtd)" >&2
  exit 1
fi

pkgs="vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86
qemu-utils debootstrap e2fsprogs dnsmasq-base iptables openssh-client"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "vm-host-setup: installing:$missing" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Recommends would pull in desktop viewers and firmware we never use.
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# /dev/kvm: libvirt's qemu user is in group kvm; a root-only node makes its
# probes hang until they time out even when KVM is unusable anyway.
if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm
  chmod 660 /dev/kvm
fi

# Start the daemons by hand only when no init system will do it for us.
if [ -d /run/systemd/system ]; then
  systemctl start virtlogd.socket libvirtd.socket libvirtd.service
else
  # A daemon stopped a moment ago waits as a zombie until init reaps it, which
  # can take a while there: only a live one counts as running.
  running() { ps -C "$1" -o stat= | grep -qv '^Z'; }
  running virtlogd || virtlogd -d
  running libvirtd || libvirtd -d
fi

# libvirtd needs a moment to open its socket after daemonising.
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  echo "vm-host-setup: libvirtd does not answer on qemu:///system" >&2
  exit 1
fi
echo "vm-host-setup: ready (vagrant $(vagrant --version 2>/dev/null | cut -d' ' -f2), libvirt up)" >&2
