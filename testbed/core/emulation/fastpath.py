"""The link emulator's C fast path: building fastpath.c and driving it with ctypes.

fastpath.c holds the forwarder's per-packet loop (receive, loss and blackhole
decisions, deadline queues, sending, counters, the wait until the next
deadline); forwarder.py keeps the command line, namespace, scheduling and the
JSON control channel and calls FastPath.run() between control messages.

The library is compiled on first use with the system C compiler ($CC split
like a shell would, else cc, else gcc; `-O2 -shared -fPIC`, no Python headers)
into the project's .cache/fastpath/, named by the hash of the source and flags:
a changed source builds a new file (and removes the older builds), and the
compile writes a temporary file, fsynced and renamed into place, so processes
building at once never load a half-written library. A cached library is
loaded before it is trusted; one that does not load is built again, once. No
compiler, a compiler that cannot run, a cache directory that cannot be
written or a failed compile is one TestbedError line naming what is wrong.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path

from testbed.base.errors import TestbedError

SOURCE = Path(__file__).with_name("fastpath.c")
CACHE_DIR = Path(__file__).resolve().parents[3] / ".cache" / "fastpath"
CFLAGS = ("-O2", "-shared", "-fPIC", "-std=gnu11")
COMPILE_TIMEOUT_S = 120
COUNTERS = ("rx", "tx", "drop_loss", "drop_blackhole", "drop_queue", "drop_sndbuf",
            "drop_error", "late_1ms")  # the order of fastpath.c's counter array


def source_digest(source: Path = SOURCE) -> str:
    """What the built library depends on: the source, the flags and the machine."""
    h = hashlib.sha256(source.read_bytes())
    h.update(" ".join(CFLAGS).encode() + platform.machine().encode())
    return h.hexdigest()[:16]


def _compiler() -> list[str] | None:
    """The compiler's command: $CC split like a shell would ("ccache gcc"), else cc, else gcc."""
    cc = os.environ.get("CC", "")
    for argv in (shlex.split(cc) if cc.strip() else [], ["cc"], ["gcc"]):
        if argv and (path := shutil.which(argv[0])):
            return [path, *argv[1:]]
    return None


def _load_error(lib: Path) -> str | None:
    """Why lib does not load (dlopen's one-line reason), or None if it does."""
    try:
        ctypes.CDLL(str(lib))
    except OSError as exc:
        return str(exc)
    return None


def build(source: Path = SOURCE, cache_dir: Path = CACHE_DIR) -> Path:
    """The compiled library for source, loadable here: compiled if this source has
    none yet or the cached one does not load (then rebuilt once)."""
    lib = cache_dir / f"{source.stem}-{source_digest(source)}.so"
    if lib.exists():
        if _load_error(lib) is None:
            return lib
        lib.unlink(missing_ok=True)  # truncated or corrupt (a crash mid-write): build it again
    cc = _compiler()
    if cc is None:
        raise TestbedError(f"the link emulator's fast path ({source.name}) needs a C compiler and "
                           "libc headers: none found (install gcc and libc6-dev, listed in "
                           "scripts/apt-packages.txt; ./scripts/bootstrap.sh installs them)")
    try:
        _compile(cc, source, lib)
    except OSError as exc:  # cache dir not writable, compiler not executable, disk full
        raise TestbedError(f"the link emulator's fast path could not be built into {cache_dir} "
                           f"with {' '.join(cc)}: {exc.strerror or exc}"
                           + (f" ({exc.filename})" if exc.filename else "")) from None
    problem = _load_error(lib)
    if problem:
        raise TestbedError(f"the link emulator's fast path was built but does not load: {problem}")
    for old in cache_dir.glob(f"{source.stem}-*.so"):  # builds of earlier sources
        if old != lib:
            old.unlink(missing_ok=True)
    return lib


def _compile(cc: list[str], source: Path, lib: Path) -> None:
    """Compile source into lib through a temporary file (fsynced, then renamed)."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
    try:
        proc = subprocess.run([*cc, *CFLAGS, "-o", str(tmp), str(source)], capture_output=True,
                              text=True, timeout=COMPILE_TIMEOUT_S, stdin=subprocess.DEVNULL,
                              env={**os.environ, "LC_ALL": "C"})
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).splitlines()
            first = next((ln for ln in lines if ": error:" in ln or ": fatal error:" in ln),
                         lines[0] if lines else "")
            raise TestbedError(f"the link emulator's fast path did not compile ({Path(cc[0]).name} "
                               f"exit {proc.returncode}): {first.strip()}")
        fd = os.open(tmp, os.O_RDONLY)
        try:  # on disk before it gets its name: a crash leaves no name on a partial file
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, lib)  # atomic: a concurrent loader sees no file or a whole one
    except subprocess.TimeoutExpired:
        raise TestbedError(f"the link emulator's fast path did not compile within "
                           f"{COMPILE_TIMEOUT_S} s") from None
    finally:
        tmp.unlink(missing_ok=True)


class FpDir(ctypes.Structure):
    """One direction's parameters (Python writes) and state/counters (C writes);
    the public part of fastpath.c's struct fp_dir, field by field."""

    _fields_ = [
        ("delay", ctypes.c_double), ("jitter", ctypes.c_double), ("loss", ctypes.c_double),
        ("ge_p", ctypes.c_double), ("ge_r", ctypes.c_double),
        ("ge_bad_loss", ctypes.c_double), ("ge_good_loss", ctypes.c_double),
        ("ge_on", ctypes.c_int32), ("reorder", ctypes.c_int32), ("blackhole", ctypes.c_int32),
        ("ge_bad", ctypes.c_int32),
        ("c", ctypes.c_uint64 * len(COUNTERS)),
        ("late_sum", ctypes.c_double), ("late_max", ctypes.c_double),
        ("queued", ctypes.c_uint64),
    ]


_LIB: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """The fast-path library (built if needed), with its functions' signatures."""
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL(str(build()))
        lib.fp_open.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint32,
                                ctypes.c_uint64]
        lib.fp_open.restype = ctypes.c_void_p
        lib.fp_dir.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.fp_dir.restype = ctypes.POINTER(FpDir)
        lib.fp_run.argtypes = [ctypes.c_void_p, ctypes.c_double]
        lib.fp_run.restype = ctypes.c_int
        lib.fp_close.argtypes = [ctypes.c_void_p]
        lib.fp_close.restype = None
        _LIB = lib
    return _LIB


class FastPath:
    """One forwarder's C data plane: frames from fd_a go out on fd_b ("up", dirs[0])
    and from fd_b out on fd_a ("down", dirs[1])."""

    def __init__(self, fd_a: int, fd_b: int, fd_ctl: int, bufsize: int, seed: int | None):
        self._lib = load()
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._fp = self._lib.fp_open(fd_a, fd_b, fd_ctl, bufsize, seed & (2**64 - 1))
        if not self._fp:
            raise MemoryError("fast path: out of memory")
        self.dirs = (self._lib.fp_dir(self._fp, 0).contents, self._lib.fp_dir(self._fp, 1).contents)

    def run(self, spin: float) -> bool:
        """Forward until the control socket is readable (True) or a signal came (False)."""
        if not self._fp:
            raise TestbedError("the link emulator's fast path was closed: it cannot run again")
        rc = self._lib.fp_run(self._fp, spin)
        if rc < 0:
            raise OSError(-rc, f"link emulator fast path: {os.strerror(-rc)}")
        return rc == 0

    def close(self) -> None:
        """Free the queues and buffers (packets still queued are dropped); `dirs`
        become Python-owned copies of the final parameters and counters."""
        if self._fp:
            self.dirs = tuple(FpDir.from_buffer_copy(d) for d in self.dirs)
            self._lib.fp_close(self._fp)
            self._fp = None
