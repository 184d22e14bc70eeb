"""Thin wrappers around the `vagrant` and `virsh` command lines.

Everything runs with the repository as working directory, so the project's
Vagrantfile is the one used whatever directory `./tb` was started from.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from testbed.tools.vm import box
from testbed.tools.vm import libvirt
from testbed.tools.vm.errors import VmError


def repo_root() -> Path:
    """The checkout: where the Vagrantfile and the box's input files are."""
    return Path(__file__).resolve().parents[3]  # testbed/tools/vm/vagrant.py


def _need(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise VmError(f"`{tool}` not found: {hint}")
    return path


def vagrant(*args: str, env: dict[str, str] | None = None, capture: bool = False,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run `vagrant ARGS` in the repository; VmError on failure when check is set."""
    exe = _need("vagrant", "install Vagrant (see docs/vagrant.md) or run scripts/vm-host-setup.sh")
    full_env = {**os.environ, **(env or {})}
    res = subprocess.run([exe, *args], cwd=repo_root(), env=full_env, text=True,
                         stdout=subprocess.PIPE if capture else None,
                         stderr=subprocess.PIPE if capture else None)
    if check and res.returncode != 0:
        detail = _last_line(res.stderr) if capture else "see the output above"
        raise VmError(f"`vagrant {' '.join(args[:2])}` failed (exit {res.returncode}): {detail}")
    return res


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def machine_state(env: dict[str, str] | None = None) -> str:
    """Vagrant's state name for the default machine: not_created, running, shutoff, ..."""
    res = vagrant("status", "--machine-readable", env=env, capture=True, check=False)
    for line in res.stdout.splitlines():
        parts = line.split(",")
        if len(parts) >= 4 and parts[2] == "state":
            return parts[3]
    raise VmError(f"`vagrant status` gave no state: {_last_line(res.stderr)}")


def machine_provider() -> str | None:
    """Provider of the machine already created in .vagrant/, if any."""
    machines = repo_root() / ".vagrant" / "machines" / "default"
    if machines.is_dir():
        for d in machines.iterdir():
            if (d / "id").is_file():
                return d.name
    return None


def require_libvirt() -> None:
    """VmError unless virsh is installed and libvirtd answers."""
    _need("virsh", "run scripts/vm-host-setup.sh (installs and starts libvirt)")
    if libvirt.virsh("version").returncode != 0:
        raise VmError(f"libvirtd does not answer on {libvirt.URI}: run scripts/vm-host-setup.sh")


def require_shareable(repo: Path) -> None:
    """The 9p share is served by qemu running as libvirt's own user, which must
    be able to reach the checkout; a private home directory stops it with an
    obscure mount error inside the guest, so say it here instead."""
    for p in (repo, *repo.parents):
        if not p.stat().st_mode & 0o001:
            raise VmError(f"libvirt's qemu user cannot reach {repo}: {p} is not searchable by others "
                          f"(chmod o+x {p}, or use a checkout outside it)")
    if not repo.stat().st_mode & 0o004:
        raise VmError(f"libvirt's qemu user cannot list {repo} (chmod o+r {repo})")


def ensure_local_box(repo: Path, force: bool = False, log=print) -> None:
    """Build (if not cached) and register the offline box with Vagrant.

    The box always has version 0, so a rebuilt box must also replace the base
    volume vagrant-libvirt copied into the storage pool: it would otherwise keep
    booting the old image, whose name has not changed.
    """
    box_path, built = box.build(repo, force=force, log=log)
    want = box.inputs_hash(repo)
    have = box.installed_box_info()
    if have and have.get("inputs_sha256") == want and not built:
        return
    if machine_state({"MPTB_BOX": "local"}) != "not_created":
        raise VmError("a VM made from an older box exists: run ./tb vm.destroy first")
    require_libvirt()
    remove_local_box()
    log(f"adding {box.BOX_NAME} to Vagrant ...")
    vagrant("box", "add", "--force", "--name", box.BOX_NAME, str(box_path), capture=True)
    prefix = box.boot_prefix(want)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinuz", "initrd.img"):
        shutil.copy(box_path.parent / name, f"{prefix}-{name}")


def remove_local_box() -> None:
    """Forget the box in Vagrant and libvirt (the build cache stays)."""
    vagrant("box", "remove", "--force", "--all", box.BOX_NAME, capture=True, check=False)
    # vagrant-libvirt copies the box image into the "default" pool on first use
    # (named after the box's timestamp, so a new box never reuses it). Old
    # copies may back existing VMs' disks: only delete them when no domain exists.
    # The same holds for the kernel copies in BOOT_DIR. A libvirtd that does
    # not answer cannot say whether domains exist: then nothing is deleted.
    if not shutil.which("virsh"):
        return
    if libvirt.virsh("version").returncode != 0:
        raise VmError(f"removed {box.BOX_NAME} from Vagrant, but libvirtd does not answer, so its copy "
                      f"in libvirt's pool stays: start libvirt (scripts/vm-host-setup.sh) and run "
                      f"./tb vm.box --remove again")
    if not libvirt.domains(""):
        prefix = box.BOX_NAME.replace("/", "-VAGRANTSLASH-") + "_vagrant_box_image_"
        for name in libvirt.volumes(prefix):
            libvirt.virsh("vol-delete", "--pool", libvirt.POOL, name)
        for f in box.BOOT_DIR.glob("mptcp-testbed-*"):
            f.unlink()
