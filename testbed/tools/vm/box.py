"""Build the offline libvirt box from Debian packages only.

No box can be downloaded in CI (no Vagrant Cloud), and downloaded boxes rot, so
the box is made here: debootstrap trixie (Debian 13), Debian's stock kernel
(6.12: MPTCP v1, sch_netem as a module), mptcpd, openssh-server, then the project's own
scripts/bootstrap.sh run inside the chroot so the apt packages *and* the pinned
venv are already in the image (in-VM provisioning is then a no-op and the guest
never needs PyPI). The result is cached under /var/cache/mptcp-testbed keyed by
a hash of everything that goes into it, with the exact package versions
recorded next to it and inside the box.

debootstrap and every chroot command run in private mount namespaces: the
mounts they need (/proc, /sys, /dev) never reach the host's mount table, and
no recursive delete here runs while anything is mounted below its directory.

The disk is a bare ext4 file system (mke2fs -d: no loop devices, no
partitioning, no boot loader), so the box boots with libvirt's direct kernel
boot; the box's own Vagrantfile points libvirt at the kernel and initrd that
travel inside the box.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path

from testbed.base.safefs import remove_tree
from testbed.tools.vm.errors import VmError

BOX_NAME = "local/mptcp-testbed-trixie"
SUITE = "trixie"
MIRROR = os.environ.get("MPTB_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("MPTB_DEBIAN_SECURITY", "http://deb.debian.org/debian-security")
GUEST_VENV = "/opt/mptcp-testbed/venv"
HOST_CA = "/tmp/host-ca.crt"  # inside the chroot, during the build only
DISK_GB = 8
# minbase keeps debootstrap short; what a bootable, ssh-able guest needs on top.
DEBOOTSTRAP_INCLUDE = ["systemd-sysv", "udev", "dbus", "kmod", "iproute2", "ca-certificates"]
# trixie's stock kernel (6.12: MPTCP v1 built in with the SYN-fallback knob and
# MPTCP_FULL_INFO, sch_netem a module). initramfs-tools named explicitly: the
# image's initrd must come from it. mptcpd is Debian's user-space path-manager
# daemon; its system service stays masked (guest_setup.sh): the testbed starts
# it inside a host's namespace only.
GUEST_PACKAGES = ["linux-image-amd64", "initramfs-tools", "openssh-server", "sudo", "e2fsprogs", "procps",
                  "mptcpd", "mptcpd-plugins"]
# Files whose content decides the box; a change in any of them means a new box.
INPUT_FILES = [
    "scripts/apt-packages.txt",
    "requirements.txt",
    "pyproject.toml",
    "scripts/bootstrap.sh",
    "testbed/tools/vm/box.py",
    "testbed/tools/vm/guest_setup.sh",
]
# What bootstrap.sh needs to see in the chroot: the editable install maps the
# top-level packages it finds to /vagrant/<pkg>, the path of the synced folder.
REPO_SUBSET = ["scripts", "requirements.txt", "pyproject.toml", "testbed", "experiments", "analysis"]
# Where qemu (running as libvirt's own user) can read the kernel: not under
# ~/.vagrant.d, which is usually private to its owner.
BOOT_DIR = Path("/var/lib/libvirt/boot")
BOX_VAGRANTFILE = """\
# Embedded in the box: boot Debian's kernel directly (the disk has no boot loader).
# `./tb vm.box` copies kernel and initrd to {boot}; the copies inside the box are
# the fallback for setups where qemu can read the user's Vagrant directory.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    here = File.dirname(__FILE__)
    shared = "{boot}"
    base = File.exist?("#{{shared}}-vmlinuz") ? shared + "-" : File.join(here, "")
    lv.kernel = "#{{base}}vmlinuz"
    lv.initrd = "#{{base}}initrd.img"
    lv.cmd_line = "root=/dev/vda rw console=ttyS0,115200 quiet"
  end
end
"""


def boot_prefix(inputs_sha256: str) -> Path:
    """Where the box's kernel and initrd for these inputs go."""
    return BOOT_DIR / f"mptcp-testbed-{inputs_sha256[:16]}"


def cache_root() -> Path:
    """The build cache: $MPTB_CACHE or /var/cache/mptcp-testbed."""
    return Path(os.environ.get("MPTB_CACHE", "/var/cache/mptcp-testbed"))


def inputs_hash(repo: Path) -> str:
    """sha256 over the input files and the builder's constants."""
    h = hashlib.sha256()
    consts = [SUITE, MIRROR, SECURITY_MIRROR, GUEST_VENV, str(DISK_GB), *DEBOOTSTRAP_INCLUDE, *GUEST_PACKAGES]
    h.update("\0".join(consts).encode())
    for rel in INPUT_FILES:
        p = repo / rel
        h.update(rel.encode() + b"\0")
        h.update(p.read_bytes() if p.exists() else b"<missing>")
    return h.hexdigest()


def box_dir(repo: Path) -> Path:
    """The cache directory of the box built from this repository's inputs."""
    return cache_root() / "boxes" / inputs_hash(repo)[:16]


def box_file(repo: Path) -> Path:
    """The box file built from this repository's inputs."""
    return box_dir(repo) / "mptcp-testbed.box"


def vagrant_home() -> Path:
    """Vagrant's home directory ($VAGRANT_HOME or ~/.vagrant.d)."""
    return Path(os.environ.get("VAGRANT_HOME", Path.home() / ".vagrant.d"))


def installed_box_info() -> dict | None:
    """box-info.json of the box Vagrant has under BOX_NAME, if any."""
    p = vagrant_home() / "boxes" / BOX_NAME.replace("/", "-VAGRANTSLASH-") / "0" / "libvirt" / "box-info.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


class _Builder:
    """One build in a scratch directory; every command's output goes to build.log."""

    def __init__(self, repo: Path, work: Path, log) -> None:
        self.repo, self.work, self.say = repo, work, log
        self.root = work / "rootfs"
        self.logfile = work / "build.log"

    def sh(self, *cmd: str, env: dict | None = None) -> str:
        with open(self.logfile, "a") as lf:
            lf.write(f"+ {' '.join(cmd)}\n")
            lf.flush()
            res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=lf, text=True,
                                 env={**os.environ, **(env or {})})
            lf.write(res.stdout)
        if res.returncode != 0:
            raise VmError(f"box build failed at `{' '.join(cmd[:4])} ...` (exit {res.returncode}); see {self.logfile}")
        return res.stdout

    def chroot(self, *cmd: str) -> str:
        # A clean, predictable environment: the host's venv/locale must not leak in.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
               "LC_ALL": "C.UTF-8", "PIP_NO_CACHE_DIR": "1", "HOME": "/root", **_passthrough_env()}
        if (self.root / HOST_CA.lstrip("/")).is_file():
            # Trust what the host trusts (e.g. a TLS-inspecting proxy) for the
            # build only: the file lives in the chroot's /tmp, wiped at the end.
            env.update({k: HOST_CA for k in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")})
        return self.sh("env", "-i", *[f"{k}={v}" for k, v in env.items()],
                       *chroot_command(self.root, *cmd))

    def build(self) -> dict:
        t0 = time.monotonic()
        self.say(f"debootstrap {SUITE} (minbase) ...")
        # debootstrap mounts /proc and /sys in the target itself: privately too.
        self.sh("unshare", "--mount", "--propagation", "private",
                "debootstrap", "--variant=minbase", f"--include={','.join(DEBOOTSTRAP_INCLUDE)}",
                SUITE, str(self.root), MIRROR)
        (self.root / "etc/apt/sources.list").write_text(
            f"deb {MIRROR} {SUITE} main\ndeb {MIRROR} {SUITE}-updates main\n"
            f"deb {SECURITY_MIRROR} {SUITE}-security main\n")
        # Never start daemons inside the chroot.
        policy = self.root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")
        host_ca = _host_ca_bundle()
        if host_ca:
            shutil.copy(host_ca, self.root / HOST_CA.lstrip("/"))
        self.say(f"kernel ({SUITE}'s stock linux-image-amd64), mptcpd, ssh, security upgrades ...")
        self.chroot("apt-get", "update", "-qq")
        self.chroot("apt-get", "-y", "-qq", "dist-upgrade")
        self.chroot("apt-get", "install", "-y", "-qq", "--no-install-recommends", *GUEST_PACKAGES)
        self.say("project bootstrap (apt packages + pinned venv) inside the chroot ...")
        self._copy_repo_subset()
        self.chroot("env", f"MPTB_VENV={GUEST_VENV}", "/bin/bash", "/vagrant/scripts/bootstrap.sh")
        # Last: systemd-resolved replaces resolv.conf with its stub, which
        # would break name resolution for the chroot steps above.
        self.chroot("apt-get", "install", "-y", "-qq", "--no-install-recommends", "systemd-resolved")
        pub = self.root / "tmp/vagrant.pub"
        shutil.copy(_insecure_pubkey(), pub)
        shutil.copy(Path(__file__).with_name("guest_setup.sh"), self.root / "tmp/guest_setup.sh")
        self.chroot("/bin/sh", "/tmp/guest_setup.sh", "/tmp/vagrant.pub")
        info = self._record()
        self.chroot("apt-get", "clean")
        policy.unlink()
        for junk in ("vagrant", "tmp", "var/lib/apt/lists"):
            remove_tree(self.root / junk)
            (self.root / junk).mkdir(mode=0o1777 if junk == "tmp" else 0o755)
        resolv = self.root / "etc/resolv.conf"
        resolv.unlink(missing_ok=True)
        resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
        self.say("disk image (ext4, qcow2) ...")
        self._image(info)
        info["build_seconds"] = round(time.monotonic() - t0, 1)
        return info

    def _copy_repo_subset(self) -> None:
        dest = self.root / "vagrant"
        dest.mkdir(exist_ok=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".venv")
        for rel in REPO_SUBSET:
            src = self.repo / rel
            if src.is_dir():
                shutil.copytree(src, dest / rel, ignore=ignore, dirs_exist_ok=True)
            elif src.exists():
                shutil.copy2(src, dest / rel)

    def _record(self) -> dict:
        """Exact versions that went into the box (the reproducibility record)."""
        pkgs = self.chroot("dpkg-query", "-W", "-f=${Package}\t${Version}\n")
        (self.work / "packages.tsv").write_text(pkgs)
        freeze = self.chroot(f"{GUEST_VENV}/bin/python", "-m", "pip", "freeze", "--exclude-editable")
        (self.work / "pip-freeze.txt").write_text(freeze)
        kernels = sorted((self.root / "lib/modules").iterdir(), key=lambda p: p.name)
        kver = kernels[-1].name
        versions = dict(line.split("\t", 1) for line in pkgs.splitlines() if "\t" in line)
        return {"box": BOX_NAME, "inputs_sha256": inputs_hash(self.repo), "suite": SUITE,
                "kernel": kver, "linux_image": versions.get(f"linux-image-{kver}")
                or versions.get(f"linux-image-{kver}-unsigned", "?"),
                "guest_venv": GUEST_VENV, "packages": versions,
                "pip": [line for line in freeze.splitlines() if line],
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def _image(self, info: dict) -> None:
        stage = self.work / "stage"
        stage.mkdir()
        kver = info["kernel"]
        shutil.copy(self.root / f"boot/vmlinuz-{kver}", stage / "vmlinuz")
        shutil.copy(self.root / f"boot/initrd.img-{kver}", stage / "initrd.img")
        raw = self.work / "root.raw"
        with open(raw, "wb") as f:
            f.truncate(DISK_GB * 1024**3)
        self.sh("mke2fs", "-q", "-F", "-t", "ext4", "-L", "mptcp-root", "-d", str(self.root), str(raw))
        self.sh("qemu-img", "convert", "-O", "qcow2", str(raw), str(stage / "box.img"))
        raw.unlink()
        meta = {"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_GB}
        (stage / "metadata.json").write_text(json.dumps(meta) + "\n")
        (stage / "Vagrantfile").write_text(BOX_VAGRANTFILE.format(boot=boot_prefix(info["inputs_sha256"])))
        (stage / "box-info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        for name in ("packages.tsv", "pip-freeze.txt"):
            shutil.copy(self.work / name, stage / name)
        # Uncompressed: the qcow2 only stores used clusters and gzip would add minutes.
        self.sh("tar", "-cf", str(self.work / "mptcp-testbed.box"), "-C", str(stage), *sorted(os.listdir(stage)))
        for name in ("box-info.json", "vmlinuz", "initrd.img"):
            shutil.copy(stage / name, self.work / name)
        shutil.rmtree(stage)


# Run in a fresh mount namespace of its own: /proc, /sys, /dev and /dev/pts of
# the chroot exist only for the one command and vanish with its last process,
# so the host's mount table never has them and a killed build leaves none.
_PSEUDO_MOUNTS = ('mount -t proc proc "$0/proc" && mount -t sysfs sysfs "$0/sys" && '
                  'mount --bind /dev "$0/dev" && mount --bind /dev/pts "$0/dev/pts" && '
                  'exec chroot "$0" "$@"')


def chroot_command(root: Path, *cmd: str) -> list[str]:
    """argv that runs cmd chrooted in root with /proc, /sys, /dev, /dev/pts mounted
    in a private mount namespace (nothing propagates to the host's)."""
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", _PSEUDO_MOUNTS,
            str(root), *cmd]


def _host_ca_bundle() -> Path | None:
    for cand in (os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile,
                 "/etc/ssl/certs/ca-certificates.crt"):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def _passthrough_env() -> dict[str, str]:
    """Proxy settings of the host, so the chroot reaches the same registries."""
    names = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
    return {n: os.environ[n] for n in names if n in os.environ}


def _insecure_pubkey() -> Path:
    """Vagrant's well-known public key, shipped inside the vagrant package
    (Debian's gem directory, or HashiCorp's /opt/vagrant bundle)."""
    patterns = [("/usr/share/rubygems-integration/all/gems", "vagrant-*/keys/vagrant.pub"),
                ("/opt/vagrant/embedded/gems", "**/vagrant-*/keys/vagrant.pub")]
    for base, pattern in patterns:
        for cand in sorted(Path(base).glob(pattern)):
            if cand.is_file():
                return cand
    raise VmError("cannot find Vagrant's insecure public key (keys/vagrant.pub); is vagrant installed?")


def _remove_dead_builds() -> None:
    """Free what builds whose process is gone (failed or killed; scratch
    directories named <key>-<pid>) left, but their build.log; refused, naming
    the mount, if anything is mounted there."""
    work = cache_root() / "work"
    for d in work.iterdir() if work.is_dir() else ():
        pid = d.name.rpartition("-")[2]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        for part in d.iterdir():
            if part.is_dir() and not part.is_symlink():
                remove_tree(part)
            elif part.name != "build.log":
                part.unlink()


def build(repo: Path, force: bool = False, log=print) -> tuple[Path, bool]:
    """Build the box unless the cache already has it; returns (box file, built?)."""
    for tool in ("debootstrap", "mke2fs", "qemu-img", "chroot", "unshare", "tar"):
        if shutil.which(tool) is None:
            raise VmError(f"`{tool}` not found: run scripts/vm-host-setup.sh first")
    if os.geteuid() != 0:
        raise VmError("building the box needs root (debootstrap, chroot, mounts)")
    final = box_dir(repo)
    if (final / "mptcp-testbed.box").is_file() and not force:
        return final / "mptcp-testbed.box", False
    _remove_dead_builds()
    work = cache_root() / "work" / f"{final.name}-{os.getpid()}"
    remove_tree(work)
    work.mkdir(parents=True)
    builder = _Builder(repo, work, log)
    try:
        info = builder.build()
    except BaseException:
        log(f"build log kept: {builder.logfile}")
        if os.environ.get("MPTB_BOX_KEEP_FAILED") != "1":  # keep the tree for debugging
            remove_tree(builder.root)
        raise
    remove_tree(builder.root)
    remove_tree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    work.rename(final)
    # Only the current box is worth keeping: older keys are never used again.
    for old in final.parent.iterdir():
        if old != final:
            remove_tree(old)
    log(f"box built in {info['build_seconds']} s: {final}")
    return final / "mptcp-testbed.box", True
