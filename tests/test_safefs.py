"""Writes that refuse planted links, deletes that refuse mounted trees, and the
offline box build's chroot mounts kept out of the host's mount table."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.base.errors import TestbedError
from testbed.base.safefs import mounts_below, open_for_write, remove_tree, write_file

ROOT = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts)")


def test_write_file_writes_and_truncates(tmp_path):
    p = tmp_path / "report.html"
    write_file(p, "a long first version\n")
    write_file(p, "short\n")
    assert p.read_text() == "short\n"
    assert (p.stat().st_mode & 0o777) == 0o644
    with open_for_write(tmp_path / "b.bin", binary=True) as f:
        f.write(b"\0\1")
    assert (tmp_path / "b.bin").read_bytes() == b"\0\1"


def test_symlinked_output_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "report.html"
    link.symlink_to(victim)
    with pytest.raises(TestbedError, match=r"refusing to write .*report\.html: .*symbolic link"):
        write_file(link, "<html>")
    # A symlinked output directory is refused as well.
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real")
    with pytest.raises(TestbedError, match="symbolic link"):
        write_file(tmp_path / "out" / "report.html", "<html>")
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "real" / "report.html").exists()


def test_hard_link_and_fifo_are_refused_without_truncating_or_hanging(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.link(victim, tmp_path / "runs.csv")
    with pytest.raises(TestbedError, match="has 2 hard links"):
        write_file(tmp_path / "runs.csv", "x")
    assert victim.read_text() == "precious\n"
    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(TestbedError, match="fifo.csv"):
        write_file(tmp_path / "fifo.csv", "x")  # no reader: would block forever without O_NONBLOCK


def test_report_refuses_a_symlinked_report_html(tmp_path):
    from analysis.report import build_report
    from synthetic_store import generate

    store = generate(tmp_path / "results", reps=1, seed=3)
    out = tmp_path / "report"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (out / "report.html").symlink_to(victim)
    with pytest.raises(TestbedError, match="report.html"):
        build_report(store, out)
    assert victim.read_text() == "precious\n"


def test_remove_tree_of_a_missing_path_is_a_no_op(tmp_path):
    remove_tree(tmp_path / "nothing")
    assert mounts_below(tmp_path) == []


@needs_root
def test_cleanup_of_a_killed_box_build_refuses_a_planted_bind_mount(tmp_path):
    """A killed build's scratch directory with something still mounted below it
    (here a stand-in for the host's /dev): the box cleanup refuses, naming the
    mount, and the mounted directory keeps its files. Runs in a private mount
    namespace of its own, so the host's mount table never sees the mount."""
    cache = tmp_path / "cache"
    rootfs = cache / "work" / "0123456789abcdef-999999999" / "rootfs"  # no such PID: dead build
    (rootfs / "dev").mkdir(parents=True)
    hostdev = tmp_path / "hostdev"
    hostdev.mkdir()
    (hostdev / "null").write_text("a device node stand-in\n")
    code = f"""
import subprocess, sys
from testbed.base.errors import TestbedError
from testbed.base.safefs import remove_tree
from testbed.tools.vm import box
subprocess.run(["mount", "--bind", {str(hostdev)!r}, {str(rootfs / "dev")!r}], check=True)
for cleanup in (box._remove_dead_builds, lambda: remove_tree({str(rootfs)!r})):
    try:
        cleanup()
    except TestbedError as e:
        print(e)
    else:
        print("deleted")
"""
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", code],
                         cwd=ROOT, env={**os.environ, "MPTB_CACHE": str(cache)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2, res.stdout
    for line in lines:
        assert line.startswith("refusing to delete ") and f"{rootfs / 'dev'} is mounted below it" in line
    assert (hostdev / "null").read_text() == "a device node stand-in\n"
    assert mounts_below(tmp_path) == []  # the mount lived and died in the private namespace
    remove_tree(cache)  # nothing mounted any more: now it goes
    assert not cache.exists()


@needs_root
def test_box_chroot_mounts_live_in_a_private_namespace(tmp_path):
    """The box build's chroot commands see /proc, /sys, /dev and /dev/pts, while
    the host's mount table never has them, not even while the command runs."""
    from testbed.tools.vm.box import chroot_command

    root = tmp_path / "rootfs"
    for d in ("proc", "sys", "dev/pts", "bin"):
        (root / d).mkdir(parents=True)
    # The smallest chroot that can run something: dash and what it links.
    ldd = subprocess.run(["ldd", "/bin/sh"], capture_output=True, text=True, check=True).stdout
    for lib in {tok for tok in ldd.split() if tok.startswith("/")} | {"/bin/sh"}:
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(Path(lib).read_bytes())
        dest.chmod(0o755)
    os.mkfifo(root / "wait")
    proc = subprocess.Popen(chroot_command(root, "/bin/sh", "-c", "read x < /wait"))
    try:
        # unshare, sh and chroot exec in turn: the PID ends up as the chrooted shell.
        for _ in range(100):
            if os.readlink(f"/proc/{proc.pid}/root") == str(root):
                break
            time.sleep(0.1)
        assert os.readlink(f"/proc/{proc.pid}/root") == str(root), "the chroot never started"
        theirs = {line.split()[4] for line in Path(f"/proc/{proc.pid}/mountinfo").read_text().splitlines()}
        assert {"/proc", "/sys", "/dev", "/dev/pts"} <= theirs, theirs
        assert mounts_below(root) == [], "a chroot mount is in the host's mount table"
        with open(root / "wait", "w") as f:
            f.write("go\n")
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert mounts_below(root) == []
