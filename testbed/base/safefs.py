"""File-system writes and deletes that are safe for root in shared directories.

Root-run tasks write reports into directories others can write to (results/ is
shared with the VM's qemu user): a planted symbolic link, hard link or FIFO
there must not make root overwrite a file elsewhere, nor hang. A recursive
delete must never descend into a mounted file system (a bind mount of /dev
left by a killed chroot build would lose the host's device nodes). Both refuse
with a one-line TestbedError instead.
"""
from __future__ import annotations

import io
import os
import shutil
import stat
from pathlib import Path

from testbed.base.errors import TestbedError


def _refuse_links(path: Path, err: OSError) -> TestbedError:
    return TestbedError(f"refusing to write {path}: it or its directory is a symbolic link "
                        f"or not a regular file ({err.strerror})")


def open_for_write(path: str | Path, binary: bool = False) -> io.IOBase:
    """Open path for writing (created mode 0644, or truncated), refusing a symbolic
    link as the file or its directory, a hard-linked file and anything not regular."""
    path = Path(path)
    dir_fd = None
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        # O_NONBLOCK: opening a planted FIFO fails (ENXIO) instead of hanging.
        fd = os.open(path.name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     0o644, dir_fd=dir_fd)
    except OSError as e:
        raise _refuse_links(path, e) from None
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"has {st.st_nlink} hard links"
        raise TestbedError(f"refusing to write {path}: it {what}")
    os.set_blocking(fd, True)
    os.ftruncate(fd, 0)  # only now: a refused file is left as it was
    return open(fd, "wb" if binary else "w", encoding=None if binary else "utf-8", closefd=True)


def write_file(path: str | Path, data: str | bytes) -> Path:
    """Write data to path through open_for_write (see there what is refused)."""
    with open_for_write(path, binary=isinstance(data, bytes)) as f:
        f.write(data)
    return Path(path)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")


def mounts_below(path: str | Path) -> list[Path]:
    """Mount points at or below path in this process's mount namespace."""
    root = Path(os.path.realpath(path))
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = Path(_unescape(line.split()[4]))
            if point == root or root in point.parents:
                found.append(point)
    return found


def remove_tree(path: str | Path) -> None:
    """shutil.rmtree, refused when anything is mounted at or below path
    (the error names the mount); a missing path is fine."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    mounted = mounts_below(path)
    if mounted:
        raise TestbedError(f"refusing to delete {path}: {mounted[0]} is mounted below it "
                           f"(unmount it first)")
    shutil.rmtree(path)
