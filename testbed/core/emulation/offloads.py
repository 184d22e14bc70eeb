"""Segmentation and checksum offloads off on the interfaces of emulated links.

With offloads on, a queue would count 64 KB GSO/GRO super-packets instead of
MTU-sized ones, loss would hit a whole super-packet at once, and a user-space
forwarder would see partial checksums. The testbed turns them off on every end
of every emulated link (Testbed), on the netem backend's internal veth pair,
and doctor checks that it can.
"""
from __future__ import annotations

from typing import Sequence

from testbed.base.errors import TestbedError
from testbed.base.netns import run_command

FEATURES = ("tx", "rx", "tso", "gso", "gro")
# ethtool's words for the features above in `ethtool -k` output.
FEATURE_NAMES = ("tx-checksumming", "rx-checksumming", "tcp-segmentation-offload",
                 "generic-segmentation-offload", "generic-receive-offload")
# A feature a driver does not have, or has fixed, is not ours to turn off.
_HARMLESS = ("not supported", "Cannot change", "Could not change any device features")


def disable_offloads(ns: int | str, ifnames: Sequence[str]) -> None:
    """Turn FEATURES off on each interface of the namespace (a pid or a namespace
    file); TestbedError naming the interface when ethtool fails for another reason."""
    for ifname in ifnames:
        res = run_command(ns, ["ethtool", "-K", ifname, *(w for f in FEATURES for w in (f, "off"))])
        problems = [line for line in (res.stderr + res.stdout).splitlines()
                    if line.strip() and not any(h in line for h in _HARMLESS)]
        if res.returncode != 0 and problems:
            raise TestbedError(f"ethtool -K {ifname}: {problems[0].strip()}")


def offload_state(ns: int | str, ifname: str) -> dict[str, str]:
    """FEATURE_NAMES -> 'on' / 'off' ('?' where ethtool does not report it)."""
    res = run_command(ns, ["ethtool", "-k", ifname])
    if res.returncode != 0:
        raise TestbedError(f"ethtool -k {ifname}: {(res.stderr or res.stdout).strip()}")
    state = dict(line.split(":", 1) for line in res.stdout.splitlines() if ":" in line)
    return {k: (state.get(k, "").split() or ["?"])[0] for k in FEATURE_NAMES}
