"""The Vagrant VM, proven end to end with the offline libvirt box.

Runs the user's own commands (scripts/vm-host-setup.sh, ./tb vm.box, ./tb vm.up
--local, ./tb vm.run ..., ./tb vm.destroy) in a VM with its own Vagrant state
directory and libvirt domain name prefix, so a developer's VM in the same
checkout is never touched. The box is cached under /var/cache/mptcp-testbed
between runs; on a machine that never built it, the first run builds it (the
time limits below fit that cold build).

Everything the test starts is removed whatever ends it, pytest's timeout
included: each command runs in its own process group (killed as a group), the
test's domains and disks are found by their unique name prefix through virsh
(vagrant may have died before recording the domain's id), and libvirt networks
(their dnsmasq) and daemons that were not running before are stopped through
libvirt and by the PIDs in their pid files.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from testbed.base.safefs import mounts_below
from testbed.tools.vm import box as boxmod
from testbed.tools.vm import libvirt as lv

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = Path(os.environ.get("MPTB_CACHE", "/var/cache/mptcp-testbed")) / "last-vm-test.json"
# Limits (s) of the steps of a VM test: 3.5-16x what they took on a machine that
# had never built the box (CI machine: 2 cores, qemu software emulation; host
# setup 21 s, box 135 s, up 55 s, doctor 6 s, demo 14 s, destroy 3 s; see
# docs/vagrant.md). A hang fails the test long before CI's 45 minutes.
HOST_SETUP_S = 300        # apt install of Vagrant, libvirt, qemu on a fresh machine
STEP_LIMITS = {"box": 480, "up": 240, "doctor_in_vm": 90, "demo_in_vm": 120, "destroy": 60}
CLEANUP_S = 120           # the sandbox's own teardown: process groups, vagrant destroy, virsh
# The module's host fixture runs inside the first test that asks for it, so
# every test's limit includes it; the VM test's limit is the sum of its steps.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(HOST_SETUP_S + 300, method="signal")]
VM_TEST_TIMEOUT = HOST_SETUP_S + sum(STEP_LIMITS.values()) + CLEANUP_S


def _readable(out: str) -> str:
    # vagrant's upload progress is one \r-line per step.
    return "\n".join(ln for ln in out.replace("\r", "\n").splitlines() if "Progress:" not in ln)


def _sh(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ROOT, env=env, text=True, timeout=timeout,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    res.stdout = _readable(res.stdout)
    return res


def _need_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (libvirt, debootstrap)")
    if platform.machine() != "x86_64" or not Path("/usr/bin/apt-get").exists():
        pytest.skip("the offline box is built on Debian/Ubuntu x86_64 hosts")


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group: orphans that exited wait
    as zombies until init reaps them, which can take a while here."""
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat_file.parent.name))
    return members


def _no_alarm():
    """Block SIGALRM (pytest-timeout's) while cleaning up: a timeout that fires
    then is delivered after the cleanup instead of cutting it short."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})


def test_host_setup_starts_libvirt_again_right_after_it_was_stopped():
    """Set up, stop, set up again: a daemon just stopped lingers as a zombie
    until init reaps it, and must not pass for a running one."""
    _need_host()
    before = lv.Footprint.now()
    if before.daemons:
        pytest.skip(f"libvirt already runs here ({sorted(before.daemons)}): not ours to stop")
    try:
        for attempt in (1, 2):
            res = _sh([str(ROOT / "scripts/vm-host-setup.sh")], dict(os.environ), timeout=HOST_SETUP_S)
            assert res.returncode == 0, f"setup {attempt}: {res.stdout[-2000:]}"
            lv.undo_since(before)
    finally:
        lv.undo_since(before)


@pytest.fixture(scope="module")
def host():
    """Host tools installed and libvirt running; stops the networks and daemons it started."""
    _need_host()
    before = lv.Footprint.now()
    modes: dict[Path, int] = {}
    try:
        res = _sh([str(ROOT / "scripts/vm-host-setup.sh")], dict(os.environ), timeout=HOST_SETUP_S)
        assert res.returncode == 0, res.stdout[-3000:]
        # qemu (libvirt's own user) serves the 9p share and must reach the checkout;
        # a CI clone may sit below a private directory: open it for the test only.
        modes = {p: p.stat().st_mode for p in (ROOT, *ROOT.parents) if not p.stat().st_mode & 0o001}
        for p, mode in modes.items():
            p.chmod((mode | 0o001) & 0o7777)
        yield before
    finally:
        mask = _no_alarm()
        try:
            for p, mode in modes.items():
                p.chmod(mode & 0o7777)
            stopped = lv.undo_since(before)
            print("host fixture stopped:", stopped or "nothing")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    after = lv.Footprint.now()
    assert set(after.daemons) == set(before.daemons), f"daemons left running: {after.daemons}"
    assert after.active_networks == before.active_networks, "libvirt networks left active"
    assert set(lv.dnsmasq_pids()) <= before.active_networks, f"dnsmasq left: {lv.dnsmasq_pids()}"


class VmSandbox:
    """One test VM: its own Vagrant state and domain name prefix, removed by
    close() whatever ended the test (also an exception raised mid-command)."""

    def __init__(self, tmp_path: Path) -> None:
        self.name = f"mptb-test-{uuid.uuid4().hex[:8]}"
        self.prefix = f"{self.name}-"
        self.dotfile = tmp_path / ".vagrant"
        self.env = {**os.environ, "MPTB_BOX": "local", "VAGRANT_DEFAULT_PROVIDER": "libvirt",
                    "VAGRANT_DOTFILE_PATH": str(self.dotfile), "MPTB_VM_PREFIX": self.prefix}
        self.procs: list[subprocess.Popen] = []  # each the leader of its own process group
        self.networks_before = lv.networks()
        self.removed: list[str] = []

    def start(self, args: list[str]) -> subprocess.Popen:
        """`./tb ARGS` in a process group of its own (vagrant, ruby and ssh included)."""
        proc = subprocess.Popen([str(ROOT / "tb"), *args], cwd=ROOT, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        """`./tb ARGS` to completion; on any exception its whole group is killed."""
        proc = self.start(args)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except BaseException:
            self._kill_group(proc)
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, _readable(out))

    @staticmethod
    def _kill_group(leader: subprocess.Popen, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL, to the leader's whole group (its pgid is its PID)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(leader.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                leader.poll()  # reap it: a zombie leader would keep the group alive
                if not _group_members(leader.pid):
                    return
                time.sleep(0.1)

    def close(self) -> None:
        """Kill what is still running, let Vagrant destroy what it knows, then
        remove through libvirt every domain/disk named after this VM and stop
        the networks that became active meanwhile and serve no domain any more."""
        mask = _no_alarm()
        try:
            for proc in self.procs:
                self._kill_group(proc)
            try:
                self.run(["vm.destroy"], timeout=STEP_LIMITS["destroy"])
            except subprocess.TimeoutExpired:
                pass  # libvirt below removes the domain anyway
            self.removed = lv.purge_domains(self.prefix)
            if not lv.domains(""):
                for net in sorted(lv.networks() - self.networks_before):
                    lv.stop_network(net)
                    self.removed.append(f"network {net}")
            for proc in self.procs:
                self._kill_group(proc)  # the vm.destroy above, should it hang
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def assert_vm_gone(self) -> None:
        """No domain, disk or qemu of this VM is left."""
        assert lv.domains(self.prefix) == [], "the test's libvirt domain is still defined"
        assert lv.volumes(self.prefix) == [], "the test's disk is still in the pool"
        assert lv.qemu_pids(self.prefix) == [], "a qemu process of the test VM is still running"

    def assert_gone(self) -> None:
        """After close(): nothing of this VM, none of its processes, no new dnsmasq."""
        self.assert_vm_gone()
        for proc in self.procs:
            assert _group_members(proc.pid) == [], f"processes of `{' '.join(proc.args[1:])}` still run"
        assert set(lv.dnsmasq_pids()) <= self.networks_before, f"dnsmasq left: {lv.dnsmasq_pids()}"


@pytest.fixture
def sandbox(host, tmp_path):
    """A VmSandbox that is closed (VM removed) whatever ends the test."""
    sb = VmSandbox(tmp_path)
    try:
        yield sb
    finally:
        sb.close()
        print("sandbox removed:", sb.removed or "nothing left")
    sb.assert_gone()


def test_vagrantfile_validates_for_both_providers(host, tmp_path):
    # VirtualBox cannot run here; a stub VBoxManage makes Vagrant consider the
    # provider usable so that its configuration is really validated.
    stub = tmp_path / "VBoxManage"
    stub.write_text("#!/bin/sh\necho 7.0.20r163906\n")
    stub.chmod(0o755)
    for provider in ("libvirt", "virtualbox"):
        for box in ("upstream", "local"):
            env = {**os.environ, "VAGRANT_DEFAULT_PROVIDER": provider, "MPTB_BOX": box,
                   "VAGRANT_DOTFILE_PATH": str(tmp_path / ".vagrant"),
                   "PATH": f"{tmp_path}:{os.environ['PATH']}"}
            res = _sh(["vagrant", "validate"], env, timeout=120)
            assert res.returncode == 0, f"{provider}/{box}: {res.stdout[-2000:]}"
    bad = _sh(["vagrant", "validate"], {**os.environ, "MPTB_VM_CPUS": "many"}, timeout=120)
    assert bad.returncode != 0 and "MPTB_VM_CPUS must be an integer" in bad.stdout


def test_vm_tasks_reject_bad_input_in_one_line(host):
    env = {**os.environ, "VAGRANT_DOTFILE_PATH": "/nonexistent/mptb-test-dotfile"}
    for args, want in ((["vm.up", "--provider=hyperv"], "unknown provider"),
                       (["vm.run", "doctor"], "the VM is not created"),
                       (["vm.run", "vm.status"], "run on the host")):
        res = _sh([str(ROOT / "tb"), *args], env, timeout=120)
        assert res.returncode != 0
        assert want in res.stdout and "Traceback" not in res.stdout, res.stdout


def test_box_remove_deletes_nothing_in_libvirt_when_libvirtd_does_not_answer(tmp_path):
    # Without libvirtd nobody can tell whether a VM still boots from the box's
    # copy in the pool or from the kernels in /var/lib/libvirt/boot.
    for tool, rc in (("virsh", 1), ("vagrant", 0)):
        stub = tmp_path / tool
        stub.write_text(f"#!/bin/sh\nexit {rc}\n")
        stub.chmod(0o755)
    boot = sorted(boxmod.BOOT_DIR.glob("mptcp-testbed-*"))
    res = _sh([str(ROOT / "tb"), "vm.box", "--remove"],
              {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}, timeout=120)
    assert res.returncode != 0 and "libvirtd does not answer" in res.stdout, res.stdout
    assert "Traceback" not in res.stdout
    assert sorted(boxmod.BOOT_DIR.glob("mptcp-testbed-*")) == boot


def test_box_inputs_are_the_checkouts_files():
    # The box's cache key and its copy of the project are read below repo_root():
    # a wrong root hashes "<missing>" and builds a box without bootstrap.sh.
    from testbed.tools.vm import box, vagrant

    assert (vagrant.repo_root() / "Vagrantfile").is_file()
    assert [f for f in box.INPUT_FILES if not (vagrant.repo_root() / f).is_file()] == []


@pytest.mark.slow
@pytest.mark.timeout(VM_TEST_TIMEOUT, method="signal")
def test_offline_box_boots_and_runs_netem_experiment(sandbox):
    out_rel = f"results/{sandbox.name}"
    timings: dict[str, float] = {}
    t_start = time.monotonic()

    def step(label: str, args: list[str]) -> str:
        t0 = time.monotonic()
        try:
            res = sandbox.run(args, timeout=STEP_LIMITS[label])
        finally:
            timings[label] = round(time.monotonic() - t0, 1)
        assert res.returncode == 0, f"{label} failed:\n{res.stdout[-4000:]}"
        return res.stdout

    try:
        # A cold build mounts /proc, /sys, /dev in its chroot: never in the host's table.
        seen_mounts: set[Path] = set()
        building = threading.Event()

        def sample_mounts() -> None:
            while not building.wait(0.2):
                seen_mounts.update(mounts_below(boxmod.cache_root()))

        sampler = threading.Thread(target=sample_mounts, daemon=True)
        sampler.start()
        try:
            step("box", ["vm.box"])
        finally:
            building.set()
            sampler.join()
        assert not seen_mounts, f"the box build mounted in the host's namespace: {sorted(seen_mounts)}"
        # Debian 13 with its 6.12 kernel and mptcpd (Debian's user-space path manager).
        info = json.loads((boxmod.box_dir(ROOT) / "box-info.json").read_text())
        assert info["suite"] == "trixie"
        assert tuple(int(x) for x in info["kernel"].split(".")[:2]) >= (6, 12), info["kernel"]
        assert "mptcpd" in info["packages"] and "mptcpd-plugins" in info["packages"]
        up = step("up", ["vm.up", "--local"])
        assert "doctor: experiments can run here" in up  # provisioning's own check
        # results/ belongs to the group qemu runs as (it writes the demo below), mode 2775.
        qemu = lv.qemu_pids(sandbox.prefix)
        assert qemu, "no qemu process of the VM"
        status = Path(f"/proc/{qemu[0]}/status").read_text()
        qemu_gid = int(next(ln for ln in status.splitlines() if ln.startswith("Gid:")).split()[2])
        st = (ROOT / "results").stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2775, qemu_gid)
        doctor = step("doctor_in_vm", ["vm.run", "doctor"])
        assert "net.mptcp.enabled=1" in doctor
        assert "backend 'netem' will be used" in doctor
        demo = step("demo_in_vm", ["vm.run", f"demo --backend netem --seconds 3 --out {out_rel}"])
        assert "backend netem" in demo
        doc = json.loads((ROOT / out_rel / "demo.json").read_text())  # seen on the host
        assert doc["result"]["protocol"] == "mptcp"
        assert doc["result"]["goodput_mbit"] > 0
        assert len(doc["result"]["path_goodput_mbit"]) == 2
        # trixie's 6.12 has MPTCP blackhole detection, which 6.1 lacked (recorded as null there).
        client = doc["testbed"]["hosts"]["client"]
        assert client["sysctls"]["net.mptcp.blackhole_timeout"] == "0", client["sysctls"]
        step("destroy", ["vm.destroy"])
        sandbox.assert_vm_gone()  # `vagrant destroy` alone removed the VM
    finally:
        shutil.rmtree(ROOT / out_rel, ignore_errors=True)
        timings["total"] = round(time.monotonic() - t_start, 1)
        TIMINGS.parent.mkdir(parents=True, exist_ok=True)
        TIMINGS.write_text(json.dumps(timings, indent=1) + "\n")
        print("vm timings (s):", timings)


class _SimulatedTimeout(BaseException):
    """Stands for pytest-timeout's failure: raised by a signal handler in the
    main thread while it waits for a command, just like the real one."""


@pytest.mark.slow
@pytest.mark.timeout(HOST_SETUP_S + STEP_LIMITS["box"] + STEP_LIMITS["up"] + CLEANUP_S, method="signal")
def test_timeout_mid_up_leaves_no_domain_qemu_or_dnsmasq(host, tmp_path):
    """A timeout while `vm.up` boots the VM, vagrant killed and its id file
    gone (as when it dies before writing it): close() still removes it all."""
    sb = VmSandbox(tmp_path)
    main = threading.main_thread().ident
    seen: dict[str, object] = {}
    stop = threading.Event()

    def watch() -> None:
        # The moment the old test leaked: qemu of the VM runs, vagrant still works.
        while not stop.is_set():
            pids = lv.qemu_pids(sb.prefix)
            if pids:
                seen["qemu"] = pids
                # vagrant dies at once (no chance to clean up after itself) and
                # its record of the domain goes with it.
                os.killpg(sb.procs[0].pid, signal.SIGKILL)
                for id_file in sb.dotfile.glob("machines/*/libvirt/id"):
                    id_file.unlink()
                signal.pthread_kill(main, signal.SIGUSR1)
                return
            stop.wait(0.5)

    def on_usr1(signum, frame):
        # Only the wait for vagrant is interrupted, as pytest-timeout would: a
        # signal that comes after it must not cut the cleanup short.
        if waiting.is_set():
            raise _SimulatedTimeout()

    waiting = threading.Event()
    old = signal.signal(signal.SIGUSR1, on_usr1)
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        watcher.start()
        try:
            waiting.set()
            try:
                res = sb.run(["vm.up", "--local"], timeout=STEP_LIMITS["box"] + STEP_LIMITS["up"])
            finally:
                waiting.clear()
            # The watcher's kill can end the wait before its signal arrives: the
            # wait then ended at the moment the timeout would have cut it (once
            # the watcher has also removed the id files).
            if not seen.get("qemu"):
                pytest.fail(f"vm.up ended (exit {res.returncode}) before its VM ran:\n{res.stdout[-3000:]}")
            watcher.join()
        except _SimulatedTimeout:
            pass
        finally:
            sb.close()
    finally:
        stop.set()
        signal.signal(signal.SIGUSR1, old)
        watcher.join()
    assert seen.get("qemu"), "the VM never started: nothing was interrupted"
    assert any(r.startswith(sb.prefix) for r in sb.removed), sb.removed
    sb.assert_gone()
