"""Host-side invoke tasks for the Vagrant VM (`./tb vm.up`, `./tb vm.run doctor`, ...).

The root tasks.py adds this collection as "vm". Every user-facing problem is
raised as VmError and printed as one line with a non-zero exit, no traceback.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import time
from typing import Callable

from invoke import Collection, task
from invoke.exceptions import Exit

from testbed.tools.cli import guard
from testbed.tools.vm import box as boxmod
from testbed.tools.vm import vagrant as vg
from testbed.tools.vm.errors import VmError

GUEST_REPO = "/vagrant"


def _one_line(fn: Callable) -> Callable:
    """The project's CLI guard: VmError (a TestbedError) becomes `error: ...`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return guard(lambda: fn(*args, **kwargs))

    return wrapper


def _log(msg: str) -> None:
    print(f"vm: {msg}", flush=True)


def _use_local(local: bool) -> bool:
    kind = os.environ.get("MPTB_BOX", "")
    if kind not in ("", "local", "upstream"):
        raise VmError(f"MPTB_BOX must be 'local' or 'upstream', got '{kind}'")
    return local or kind == "local"


def _require_running() -> None:
    state = vg.machine_state()
    if state != "running":
        raise VmError(f"the VM is {state.replace('_', ' ')}: start it with ./tb vm.up")


@task(help={"force": "rebuild even if the cache has a box for these inputs",
            "remove": "remove the box from Vagrant and libvirt (the build cache stays)"})
@_one_line
def box(c, force=False, remove=False):
    """Build the offline libvirt box from Debian packages (cached) and add it to Vagrant."""
    if remove:
        vg.remove_local_box()
        _log(f"removed {boxmod.BOX_NAME} from Vagrant")
        return
    t0 = time.monotonic()
    repo = vg.repo_root()
    vg.ensure_local_box(repo, force=force, log=_log)
    info = boxmod.installed_box_info() or {}
    _log(f"{boxmod.BOX_NAME} ready: kernel {info.get('kernel', '?')}, "
         f"inputs {info.get('inputs_sha256', '?')[:16]}, cache {boxmod.box_dir(repo)} "
         f"({time.monotonic() - t0:.0f} s)")


@task(help={"provider": "libvirt or virtualbox (default: Vagrant's choice; libvirt with --local)",
            "local": "use the offline box from `./tb vm.box` (same as MPTB_BOX=local)"})
@_one_line
def up(c, provider="", local=False):
    """Create/start the VM and provision it (bootstrap + doctor inside)."""
    use_local = _use_local(local)
    env = {"MPTB_BOX": "local"} if use_local else {}
    if use_local:
        if provider and provider != "libvirt":
            raise VmError("the offline box exists for the libvirt provider only")
        provider = "libvirt"
    if provider not in ("", "libvirt", "virtualbox"):
        raise VmError(f"unknown provider '{provider}' (libvirt or virtualbox)")
    if provider == "libvirt":
        vg.require_libvirt()
        vg.require_shareable(vg.repo_root())
    if use_local:
        vg.ensure_local_box(vg.repo_root(), log=_log)
    t0 = time.monotonic()
    args = ["up"] + ([f"--provider={provider}"] if provider else [])
    vg.vagrant(*args, env=env)
    _log(f"up and provisioned in {time.monotonic() - t0:.0f} s")


@task
@_one_line
def ssh(c):
    """Open a shell in the VM (the repository is at /vagrant)."""
    _require_running()
    vg.vagrant("ssh", check=False)


@task(positional=["command"],
      help={"command": "the ./tb task to run in the VM, optionally with its arguments in quotes"})
@_one_line
def run(c, command):
    """Run a ./tb task inside the VM; results land in the synced repository.

    E.g. `./tb vm.run doctor`, `./tb vm.run "demo --seconds 3 --out results/vm-demo"`
    or `./tb vm.run demo -- --seconds 3 --out results/vm-demo`.

    Relative output paths land in the repository, which is the synced folder,
    so results appear on the host.
    """
    argv = shlex.split(command) + shlex.split(getattr(c, "remainder", "") or "")
    if not argv:
        raise VmError("vm.run needs a task name, e.g. ./tb vm.run doctor")
    if argv[0].startswith("vm."):
        raise VmError("vm.* tasks run on the host, not inside the VM")
    _require_running()
    remote = (f"cd {GUEST_REPO} && sudo env MPTB_VENV={boxmod.GUEST_VENV} ./tb "
              + " ".join(shlex.quote(a) for a in argv))
    t0 = time.monotonic()
    res = vg.vagrant("ssh", "-c", remote, check=False)
    _log(f"`./tb {' '.join(argv)}` in the VM: exit {res.returncode} ({time.monotonic() - t0:.0f} s)")
    if res.returncode != 0:
        raise Exit(code=res.returncode)


@task
@_one_line
def halt(c):
    """Shut the VM down (keeps its disk)."""
    vg.vagrant("halt")


@task
@_one_line
def destroy(c):
    """Delete the VM and its disk (the box stays)."""
    vg.vagrant("destroy", "-f")


@task(help={"json_out": "print machine-readable JSON"})
@_one_line
def status(c, json_out=False):
    """Show the VM's state and which offline box is cached/installed."""
    repo = vg.repo_root()
    info = boxmod.installed_box_info()
    want = boxmod.inputs_hash(repo)
    report = {
        "state": vg.machine_state(),
        "provider": vg.machine_provider(),
        "local_box": {
            "name": boxmod.BOX_NAME,
            "cached": boxmod.box_file(repo).is_file(),
            "installed": info is not None,
            "current": bool(info and info.get("inputs_sha256") == want),
            "kernel": info.get("kernel") if info else None,
        },
    }
    if json_out:
        print(json.dumps(report, indent=1))
        return
    lb = report["local_box"]
    print(f"VM: {report['state']}" + (f" ({report['provider']})" if report["provider"] else ""))
    print(f"offline box {lb['name']}: cached={lb['cached']} installed={lb['installed']} "
          f"up-to-date={lb['current']} kernel={lb['kernel'] or '-'}")


ns = Collection("vm")
for _t in (box, up, ssh, run, halt, destroy, status):
    ns.add_task(_t)
