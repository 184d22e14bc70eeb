#!/bin/sh
# Runs INSIDE the box's chroot (called by testbed/tools/vm/box.py) after debootstrap.
# Turns a bare Debian tree into something Vagrant can boot and log into:
# a vagrant user with the well-known insecure key, DHCP on every NIC, per-VM
# identity (machine-id, ssh host keys) created on first boot, not baked in.
# Argument: path (inside the chroot) of Vagrant's insecure public key.
set -eu
pubkey=$1

echo mptcp-testbed > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 mptcp-testbed\n' > /etc/hosts
# Direct kernel boot with the disk as /dev/vda and no partition table.
echo '/dev/vda / ext4 errors=remount-ro 0 1' > /etc/fstab

# DHCP on whatever NIC the provider gives us (names differ between providers).
mkdir -p /etc/systemd/network
cat > /etc/systemd/network/10-dhcp.network <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
systemctl enable systemd-networkd.service >/dev/null 2>&1
systemctl enable systemd-resolved.service >/dev/null 2>&1 || true
systemctl enable ssh.service >/dev/null 2>&1
# mptcpd (Debian's user-space path manager) runs only where the testbed starts
# it, inside a host's namespace; its system service would manage the VM's own
# addresses, so it is masked.
ln -sf /dev/null /etc/systemd/system/mptcp.service

# Vagrant's conventions: user vagrant, passwordless sudo, insecure key (Vagrant
# swaps it for a fresh per-VM key on first `vagrant up`).
id vagrant >/dev/null 2>&1 || useradd -m -s /bin/bash vagrant
echo 'vagrant:vagrant' | chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/vagrant
chmod 440 /etc/sudoers.d/vagrant
install -d -m 700 -o vagrant -g vagrant /home/vagrant/.ssh
install -m 600 -o vagrant -g vagrant "$pubkey" /home/vagrant/.ssh/authorized_keys
# Vagrant runs `sudo` over ssh without a tty; DNS lookups for the client
# address would only slow every command down.
echo 'UseDNS no' > /etc/ssh/sshd_config.d/vagrant.conf

# Every VM must get its own identity: empty machine-id is filled in by systemd
# at first boot; host keys are regenerated before sshd starts.
rm -f /etc/ssh/ssh_host_*
mkdir -p /etc/systemd/system/ssh.service.d
# The empty ExecStartPre= drops Debian's `sshd -t`, which would fail first.
printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
  > /etc/systemd/system/ssh.service.d/hostkeys.conf
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id

# The testbed needs these modules at run time; load them at boot so the check
# in provisioning sees them (they are modules in Debian's kernel).
printf 'sch_netem\n9p\n9pnet_virtio\n' > /etc/modules-load.d/mptcp-testbed.conf
mkdir -p /vagrant
