"""Link emulation: delay, loss, bursts, live changes, timed events, fidelity.

On this machine (no sch_netem) the user-space backend does the work; the netem
backend must refuse with a clear error instead of running without delay.
Bounds are generous: other test runs share the 2 CPUs.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import pytest

from testbed.core import emulation
from testbed.core.emulation.calibrate import ping_rtts
from testbed.core.emulation.events import EventScheduler
from testbed.core.events import EventSpec
from testbed.core.emulation.netem import NetemBackend, netem_args
from testbed.base.errors import TestbedError
from testbed.core.model import GilbertElliott, LinkParams
from testbed.core.net import Testbed
from testbed.core.topology import from_dict, load

root = pytest.mark.root


def one_path(**path) -> object:
    spec = {"name": "p1", "rate_mbit": 100, "delay_ms": 0, **path}
    return from_dict({"name": "one", "paths": [spec]})


# ---- helpers ----------------------------------------------------------------
class UdpStream:
    """Numbered, timestamped UDP datagrams client -> server every `interval` s."""

    def __init__(self, tb: Testbed, interval: float = 0.001, port: int = 5501, size: int = 64):
        self.tb, self.interval, self.size = tb, interval, size
        self.dst = (tb.server_addr, port)

        def rx_sock() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.bind(self.dst)
            s.settimeout(0.1)
            return s

        self.rx = tb.in_ns(tb.server, rx_sock)
        self.tx = tb.in_ns(tb.client, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.received: list[tuple[int, float, float]] = []  # seq, t_sent, t_received
        self.sent = 0
        self._stop = threading.Event()
        self._rx_done = threading.Event()

    def _receive(self) -> None:
        quiet = 0
        while quiet < 10:  # 1 s of silence after the sender stopped
            try:
                data = self.rx.recv(4096)
            except TimeoutError:
                if self._stop.is_set():
                    quiet += 1
                continue
            seq, t_sent = struct.unpack_from("!Id", data)
            self.received.append((seq, t_sent, time.monotonic()))
        self._rx_done.set()

    def run(self, seconds: float | None = None, count: int | None = None) -> UdpStream:
        th = threading.Thread(target=self._receive, daemon=True)
        th.start()
        buf = bytearray(self.size)
        t0 = time.monotonic()
        i = 0
        while True:
            now = time.monotonic()
            if (seconds is not None and now - t0 >= seconds) or (count is not None and i >= count):
                break
            struct.pack_into("!Id", buf, 0, i, now)
            try:
                self.tx.sendto(buf, self.dst)
            except OSError:
                pass  # e.g. ENETUNREACH once the path is down
            i += 1
            nxt = t0 + i * self.interval
            while True:
                left = nxt - time.monotonic()
                if left <= 0:
                    break
                time.sleep(left if left > 0.0005 else 0)
        self.sent = i
        self._stop.set()
        th.join(30)
        self.rx.close()
        self.tx.close()
        return self


def loss_runs(received_seqs: set[int], n: int) -> list[int]:
    runs, cur = [], 0
    for i in range(n):
        if i in received_seqs:
            if cur:
                runs.append(cur)
            cur = 0
        else:
            cur += 1
    if cur:
        runs.append(cur)
    return runs


# ---- no root needed -----------------------------------------------------------
def test_netem_arguments_keep_jitter_in_order_and_map_gilbert():
    args = netem_args(LinkParams(delay_ms=10, jitter_ms=2))
    assert args[:2] == ["limit", "1000000"] and "10000us" in args and "2000us" in args
    assert args[-2:] == ["rate", "100gbit"]  # netem's rate mode: no reordering
    assert "rate" not in netem_args(LinkParams(delay_ms=10, jitter_ms=2, reorder=True))
    ge = netem_args(LinkParams(gilbert=GilbertElliott(p_pct=1, r_pct=25, bad_loss_pct=90)))
    assert ge[ge.index("gemodel"):] == ["gemodel", "1%", "25%", "90%", "0%"]
    assert netem_args(LinkParams(loss_pct=3), blackhole=True)[-3:] == ["loss", "random", "100%"]


@root
def test_scheduler_rejects_unknown_paths_and_a_carrierless_bottleneck():
    with Testbed(load("shared-bottleneck", delay_ms=0), backend="userspace") as tb:
        with pytest.raises(TestbedError, match="no path 'p9'"):
            EventScheduler(tb, [EventSpec(at_s=1, action="link_down", path="p9")])
        with pytest.raises(TestbedError, match="bottleneck has no carrier"):
            EventScheduler(tb, [EventSpec(at_s=1, action="link_down", path="bottleneck")])


def test_binomial_interval_of_benchmark():
    from testbed.tools.bench.emulation import binomial_interval

    lo, hi = binomial_interval(10_000, 0.01)
    assert 70 <= lo <= 80 and 120 <= hi <= 130


# ---- netem refuses here ---------------------------------------------------------
@root
@pytest.mark.timeout(60)
def test_forcing_netem_without_sch_netem_is_a_clear_error_never_a_run_without_delay():
    problem = NetemBackend.check()
    if problem is None:
        pytest.skip("this kernel has sch_netem")
    assert "sch_netem" in problem and "userspace" in problem
    assert "modules" in problem  # names the package to install
    with pytest.raises(TestbedError) as err:
        Testbed(load("two-path"), backend="netem")
    msg = str(err.value)
    assert "sch_netem" in msg and "userspace" in msg and "\n" not in msg


@root
@pytest.mark.timeout(30)
def test_auto_picks_a_backend_that_delays():
    with Testbed(one_path(delay_ms=5)) as tb:
        assert tb.backend.name in ("netem", "userspace")
        assert "userspace" in emulation.backends()


# ---- user-space backend -------------------------------------------------------------
@root
@pytest.mark.timeout(60)
def test_2x10ms_one_way_gives_rtt_19_to_23_ms():
    with Testbed(load("two-path", wifi_delay_ms=10, lte_delay_ms=10, rate_mbit=20),
                 backend="userspace") as tb:
        for p in tb.paths:
            rtt = ping_rtts(tb.client.pid, p.addr.far, 200, interval=0.005, src=p.addr.client)
            assert rtt["answered"] >= 198 and rtt["n"] >= 100, (p.name, rtt)  # n: not discarded
            assert 19 <= rtt["mean_ms"] <= 23, (p.name, rtt)
            assert rtt["min_ms"] >= 19.95, rtt  # never faster than configured
        pids = tb.backend.pids()
        assert len(pids) == 2 and all(os.path.exists(f"/proc/{pid}") for pid in pids)
    for pid in pids:  # stopped with the testbed
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


@root
@pytest.mark.timeout(90)
def test_10pct_loss_gives_5_to_15pct_over_2000_pings():
    topo = one_path(delay_ms=1, up={"loss_pct": 10})
    with Testbed(topo, backend="userspace") as tb:
        rtt = ping_rtts(tb.client.pid, tb.server_addr, 2000, interval=0.002)
        loss = 100 * (2000 - rtt["answered"]) / 2000
        assert 5 <= loss <= 15, loss
        counted = tb.backend.stats(tb.paths[0].link)["up"]
        assert counted["drop_loss"] > 0 and counted["drop_queue"] == 0


@root
@pytest.mark.timeout(90)
def test_gilbert_elliott_loses_in_bursts():
    # p = 2 %, r = 20 %: mean loss 2/22 = 9.1 %, mean burst 1/r = 5 packets.
    ge = {"p_pct": 2, "r_pct": 20, "bad_loss_pct": 100, "good_loss_pct": 0}
    with Testbed(one_path(up={"gilbert": ge}), backend="userspace") as tb:
        s = UdpStream(tb, interval=0.0005).run(count=6000)
    seqs = {r[0] for r in s.received}
    loss = 100 * (s.sent - len(seqs)) / s.sent
    runs = loss_runs(seqs, s.sent)
    mean_burst = sum(runs) / len(runs)
    assert 4 <= loss <= 16, loss
    assert mean_burst >= 2.5, mean_burst  # independent loss at 9 % would give ~1.1
    assert max(runs) >= 8


@root
@pytest.mark.timeout(60)
def test_jitter_does_not_reorder_unless_asked():
    for reorder in (False, True):
        topo = one_path(delay_ms=10, jitter_ms=5, reorder=reorder)
        with Testbed(topo, backend="userspace") as tb:
            s = UdpStream(tb, interval=0.0005).run(count=2000)
        seqs = [r[0] for r in s.received]
        assert len(seqs) >= 1990
        inversions = sum(1 for a, b in zip(seqs, seqs[1:]) if b < a)
        owd = sorted(r[2] - r[1] for r in s.received)
        assert owd[len(owd) // 2] >= 0.009  # still ~10 ms one way
        if reorder:
            assert inversions > 50
        else:
            assert inversions == 0


@root
@pytest.mark.timeout(60)
def test_live_delay_update_changes_rtt_at_once():
    with Testbed(one_path(delay_ms=10), backend="userspace") as tb:
        before = ping_rtts(tb.client.pid, tb.server_addr, 50, interval=0.01)
        t = time.monotonic()
        tb.apply_event(EventSpec(at_s=0, action="set_link", path="p1", changes={"delay_ms": 30}))
        took = time.monotonic() - t
        after = ping_rtts(tb.client.pid, tb.server_addr, 50, interval=0.01, warmup=False)
        assert 19 <= before["mean_ms"] <= 23
        assert 59 <= after["mean_ms"] <= 63, after
        assert took < 0.05
        tb.apply_event(EventSpec(at_s=0, action="set_link", path="p1", direction="up",
                                 changes={"delay_ms": 0, "loss_pct": 0}))
        assert tb.paths[0].link.up.delay_ms == 0 and tb.paths[0].link.down.delay_ms == 30
        third = ping_rtts(tb.client.pid, tb.server_addr, 50, interval=0.01, warmup=False)
        assert 29 <= third["mean_ms"] <= 33, third


@root
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["down", "blackhole"])
def test_timed_link_down_stops_traffic_within_50ms(kind):
    with Testbed(one_path(delay_ms=5), backend="userspace") as tb:
        t_event = 1.0
        ev = EventSpec(at_s=t_event, action="link_down" if kind == "down" else "blackhole", path="p1")
        stream = UdpStream(tb, interval=0.001)
        sched = EventScheduler(tb, [ev])
        t0 = time.monotonic()
        sched.start(t0)
        stream.run(seconds=2.0)
        sched.stop()
        rec = sched.records[0]
        assert rec.ok, rec
        assert rec.start_lateness_ms <= 5.0, rec  # target 1 ms; generous on a shared machine
        t_down = t0 + t_event
        sent_times = [r[1] for r in stream.received]
        assert sum(1 for t in sent_times if t < t_down - 0.05) >= 800  # flowing before
        last_sent = max(sent_times)
        assert last_sent <= t_down + 0.05, f"traffic sent {1000 * (last_sent - t_down):.1f} ms after t"
        assert last_sent >= t_down - 0.05  # and not stopped long before


@root
@pytest.mark.timeout(60)
def test_scheduled_changes_are_recorded_with_applied_times():
    with Testbed(one_path(delay_ms=5), backend="userspace") as tb:
        events = [EventSpec(at_s=0.2, action="set_link", path="p1", changes={"delay_ms": 20}),
                  EventSpec(at_s=0.4, action="set_link", path="p1", changes={"rate_mbit": 10}),
                  EventSpec(at_s=0.6, action="blackhole", path="p1", direction="up"),
                  EventSpec(at_s=0.7, action="unblackhole", path="p1", direction="up")]
        with EventScheduler(tb, events) as sched:
            time.sleep(1.0)
        assert [r.ok for r in sched.records] == [True] * 4
        for r in sched.records:
            assert r.scheduled <= r.began <= r.done
            assert r.applied_lateness_ms < 20, r
        assert tb.paths[0].link.up.delay_ms == 20 and tb.paths[0].link.up.rate_mbit == 10
        link = tb.paths[0].link
        for port in (link.port_a, link.port_b):  # the HTB classes really changed
            assert "rate 10Mbit" in link.node.cmd(f"tc class show dev {port}")
        rtt = ping_rtts(tb.client.pid, tb.server_addr, 20, interval=0.01)
        assert 39 <= rtt["mean_ms"] <= 44


# An honest calibration and one of a lying emulator: tests/test_calibration_quick.py


@root
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_path_mptcp_aggregates_with_delay():
    from testbed.core.bulk import bulk_transfer

    with Testbed(load("two-path", wifi_delay_ms=10, lte_delay_ms=40, rate_mbit=20),
                 backend="userspace") as tb:
        res = bulk_transfer(tb, seconds=10, warmup=3, protocol="mptcp", cc="cubic")
        assert res.goodput_mbit >= 0.85 * 40, res


# ---- the emulator judged over every run ----------------------------------------------
def _dir(tx: int, late: int = 0, **drops: int) -> dict:
    return {"tx": tx, "late_1ms": late, "late_max_us": 8100.0 if late else 300.0,
            "drop_rcvbuf": 0, "drop_sndbuf": 0, "drop_error": 0, "drop_queue": 5,
            "drop_loss": 7, **drops}


def test_run_judge_names_the_measured_value_and_the_bound():
    from testbed.core.emulation.calibrate import judge_run

    before = {"x1": {"up": _dir(1000, 3), "down": _dir(500)}}
    ok = judge_run(before, {"x1": {"up": _dir(21000, 4), "down": _dir(10500)}})
    assert ok["valid"] and ok["judged"] and ok["links"]["x1"]["up"]["late_1ms"] == 1
    # a short run: 5 late of 600 is 0.8 %, but within the 10 packets always accepted
    assert judge_run(before, {"x1": {"up": _dir(1600, 8), "down": _dir(500)}})["valid"]
    late = judge_run(before, {"x1": {"up": _dir(11000, 403), "down": _dir(10500, drop_rcvbuf=17)}})
    assert not late["valid"]
    assert late["reason"] == ("x1 up: 400 of 10000 packets (4.00%) left more than 1 ms late "
                              "(max 8.1 ms), bound 0.1%; x1 down: 17 packets dropped by the kernel "
                              "before the forwarder read them (drop_rcvbuf), bound 0")
    assert judge_run(None, None) == {"valid": True, "judged": False, "reason": None,
                                     "tolerance": late["tolerance"],
                                     "why": "the backend reports no per-packet counters"}


def test_calibration_reason_names_what_was_short(monkeypatch):
    """50 of 50 answered, yet invalid: the reason must say why (usable samples)."""
    from types import SimpleNamespace

    from testbed.core.emulation import calibrate as cal

    monkeypatch.setattr(cal, "ping_rtts", lambda *a, **kw: {
        "n": 3, "sent": 50, "answered": 50, "discarded": 47, "mean_ms": 20.0, "p50_ms": 20.0,
        "p99_ms": 20.0, "min_ms": 20.0, "max_ms": 20.0, "samples_ms": [20.0] * 3})
    graph = from_dict({"name": "one", "paths": [{"name": "lte", "delay_ms": 10}]}).graph()
    link = SimpleNamespace(name="lte", up=LinkParams(delay_ms=10), down=LinkParams(delay_ms=10))
    path = SimpleNamespace(name="lte", graph=graph.paths[0], addr=graph.paths[0].addr)
    node = SimpleNamespace(pid=1)
    tb = SimpleNamespace(graph=graph, links=[link], node=lambda name: node, client=node,
                         paths=[path], backend=SimpleNamespace(name="userspace"))
    res = cal.calibrate(tb, measure_rate=False, quick=False)  # one round of all 50
    assert not res["valid"]
    assert res["reason"] == ("lte: 3 usable RTT samples of 50 answered pings (47 discarded: "
                             "sending took over 0.2 ms), need at least 5")


@root
@pytest.mark.timeout(120)
def test_a_forwarder_that_falls_behind_during_traffic_breaks_the_run_judge():
    import signal as sig

    from testbed.core.bulk import bulk_transfer
    from testbed.core.emulation.calibrate import emulator_counters, judge_run

    with Testbed(load("two-path", wifi_delay_ms=2, lte_delay_ms=2, rate_mbit=20),
                 backend="userspace") as tb:
        before = emulator_counters(tb)
        bulk_transfer(tb, seconds=1.5, warmup=0.5, protocol="mptcp", cc="cubic")
        honest = judge_run(before, emulator_counters(tb))
        assert honest["valid"] and honest["judged"], honest
        assert honest["links"]["wifi"]["up"]["tx"] > 1000
        # Stall one forwarder for 30 ms, 10 times, while traffic flows: its packets
        # leave up to 30 ms late, as on a machine short of CPU.
        pid = tb.backend.pids()[0]
        before = emulator_counters(tb)

        def stall() -> None:
            time.sleep(0.5)
            for _ in range(10):
                os.kill(pid, sig.SIGSTOP)
                time.sleep(0.03)
                os.kill(pid, sig.SIGCONT)
                time.sleep(0.05)

        t = threading.Thread(target=stall)
        t.start()
        try:
            bulk_transfer(tb, seconds=2, warmup=0.5, protocol="mptcp", cc="cubic")
        finally:
            t.join()
            os.kill(pid, sig.SIGCONT)
        bad = judge_run(before, emulator_counters(tb))
        assert not bad["valid"] and "more than 1 ms late" in bad["reason"], bad


def test_capacity_warning_only_above_the_cached_measurement(tmp_path):
    from testbed.core.emulation.calibrate import capacity_warning, save_capacity

    cache = tmp_path / "capacity.json"
    eight = load("n-path", n=8, rate_mbit=100)
    assert capacity_warning(eight, "userspace", cache) is None  # never measured: nothing to say
    save_capacity({"capacity_mbit": 400, "measured": "2026-11-30 10:00 UTC"}, cache)
    line = capacity_warning(eight, "userspace", cache)
    assert line == ("n-path: 800 Mbit/s in all through the user-space link emulator, this machine "
                    "keeps time up to 400 Mbit/s (measured 2026-11-30 10:00 UTC by ./tb "
                    "bench.capacity): expect runs stored invalid")
    assert capacity_warning(load("n-path", n=4, rate_mbit=100), "userspace", cache) is None
    assert capacity_warning(eight, "netem", cache) is None
    data = json.loads(cache.read_text())
    data["key"]["kernel"] = "another"  # measured on another kernel: not trusted
    cache.write_text(json.dumps(data))
    assert capacity_warning(eight, "userspace", cache) is None


@root
def test_a_stopping_forwarder_leaves_real_time_before_it_winds_down():
    """A forwarder runs SCHED_FIFO; its exit (interpreter teardown, tens of ms
    of CPU) must not run at that priority, or the forwarders of a testbed
    beside it wait behind it. The stop answer carries the policy the kernel
    reports at that moment, and the process is gone soon after."""
    import subprocess
    import sys

    ns = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fwd = None
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{ns.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "unshare did not switch namespaces"
            time.sleep(0.01)
        subprocess.run(["nsenter", "-t", str(ns.pid), "-n", "ip", "link", "add", "pa", "type",
                        "veth", "peer", "name", "pb"], check=True)
        for port in ("pa", "pb"):
            subprocess.run(["nsenter", "-t", str(ns.pid), "-n", "ip", "link", "set", port, "up"],
                           check=True)
        fwd = subprocess.Popen([sys.executable, "-m", "testbed.core.emulation.forwarder",
                                "--netns", f"/proc/{ns.pid}/ns/net", "--port-a", "pa",
                                "--port-b", "pb", "--ctl-fd", str(child.fileno()), "--sched", "fifo"],
                               pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        child.close()
        ctl.settimeout(10)
        hello = json.loads(ctl.recv(65536))
        assert hello["ready"] and hello["sched"] == "fifo:10", hello
        ctl.send(json.dumps({"op": "stop"}).encode())
        reply = json.loads(ctl.recv(1 << 20))
        assert reply["ok"] and reply["stats"]["sched"] == "fifo:10", reply
        assert reply["exit_sched"] == "other", reply
        assert fwd.wait(timeout=5) == 0
    finally:
        if fwd is not None and fwd.poll() is None:
            fwd.kill()
            fwd.wait()
        ns.kill()
        ns.wait()
        ctl.close()
