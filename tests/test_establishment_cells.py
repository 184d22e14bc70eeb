"""The draft's establishment cells hold RobE over kernel sockets against a kernel
server only: runs with the user-space stack on a side stay out (no root)."""
import pandas as pd

from analysis import establishment_checks as ec


def test_user_stack_runs_stay_out_of_the_drafts_cells(monkeypatch):
    df = pd.DataFrame({"param.condition": ["healthy"] * 4, "param.strategy": ["sim"] * 4,
                       "param.client_stack": ["kernel", "user", None, "kernel"],
                       "param.server_stack": [None, "kernel", "kernel", "user"]})
    monkeypatch.setattr(ec, "establishment_data", lambda res: df)
    cell = ec.Establishment(None).cell("healthy", "sim")
    assert list(cell.index) == [0, 2]   # kernel/kernel, and a run from before the parameters


# ---- RobE_eSIM's column and the user-stack comparison (analysis.esim_checks) ------
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

from analysis import esim_checks as esim  # noqa: E402

# two-path: wifi 2 x 10 ms (the default), lte 2 x 20 ms
CHANGES = {"healthy": {}, "slow_default": {"wifi": {"delay_ms": 100.0}}, "lossy10": {"wifi": {"loss_pct": 10.0}},
           "blackhole": {"wifi": {"blackholed": ["up", "down"]}}, "mptcp_drop": {"wifi": {"middlebox": "mptcp_drop"}}}


def _manifest(condition: str) -> dict:
    links = {}
    for name, delay in (("wifi", 10.0), ("lte", 20.0)):
        change = CHANGES[condition].get(name, {})
        d = {"delay_ms": change.get("delay_ms", delay), "loss_pct": change.get("loss_pct", 0.0), "rate_mbit": 20.0}
        links[name] = {"up": d, "down": d, "blackholed": change.get("blackholed", []),
                       "middlebox": change.get("middlebox"), "carrier": True}
    return {"links_at_end": links, "testbed": {"topology": {"default_path": "wifi"}}}


def _runs(*specs: dict) -> tuple[pd.DataFrame, SimpleNamespace]:
    """Runs from dicts of (condition, strategy, client, server, metrics...); the store they came from."""
    rows, manifests = [], {}
    for i, s in enumerate(specs):
        run = {"experiment": "establishment", "run_id": f"r{i}", "param.condition": s.get("condition", "healthy"),
               "param.strategy": s.get("strategy", "esim"), "param.client_stack": s.get("client", "user"),
               "param.server_stack": s.get("server", "user"), "metric.outcome": s.get("outcome", "mptcp"),
               "metric.winner_path": s.get("winner", "wifi"), "metric.setup_s": s.get("setup", 0.021),
               "metric.multipath_s": s.get("mp_server", np.nan),
               "metric.multipath_client_s": s.get("mp", np.nan),
               "metric.esim_subflows": s.get("esim_subflows", 0), "metric.esim_fallback": s.get("fallback", False)}
        rows.append(run)
        manifests[("establishment", f"r{i}")] = _manifest(run["param.condition"])
    return pd.DataFrame(rows), SimpleNamespace(manifests=manifests)


def _with(monkeypatch, *specs: dict) -> SimpleNamespace:
    df, res = _runs(*specs)
    monkeypatch.setattr(ec, "establishment_data", lambda r: df)
    return res


def _user(res) -> ec.Establishment:
    return ec.Establishment(res, "user", "user")


def test_esim_setup_within_the_fastest_working_path(monkeypatch):
    res = _with(monkeypatch, *[{"setup": 0.0212}] * 3, {"condition": "lossy10", "setup": 0.0415, "winner": "lte"},
                {"strategy": "esim", "server": "kernel", "setup": 0.090})   # another pair of stacks
    assert esim.setup_fastest(_user(res), "healthy", "esim")[2] == ec.HOLDS
    # lossy wifi: the bound is the loss-free lte (40 ms + 5 ms)
    crit, _, verdict = esim.setup_fastest(_user(res), "lossy10", "esim")
    assert verdict == ec.HOLDS and "lte" in crit
    res = _with(monkeypatch, *[{"setup": 0.0212}] * 2, {"setup": 0.0412})   # one run took lte's RTT
    assert esim.setup_fastest(_user(res), "healthy", "esim")[2] == ec.FAILS
    res = _with(monkeypatch, {"setup": 0.021}, {"setup": np.nan, "outcome": "failed"})
    assert esim.setup_fastest(_user(res), "healthy", "esim")[2] == ec.FAILS


def test_esim_multipath_after_the_slowest_mp_capable_handshake(monkeypatch):
    res = _with(monkeypatch, *[{"mp": 0.0425}] * 3, *[{"condition": "slow_default", "mp": 0.2012, "winner": "lte"}] * 2)
    assert esim.multipath_slowest(_user(res), "healthy")[2] == ec.HOLDS
    assert esim.multipath_slowest(_user(res), "slow_default")[2] == ec.HOLDS
    res = _with(monkeypatch, *[{"mp": 0.0425}] * 2, {"mp": 0.083})   # one loser joined as SIM would
    assert esim.multipath_slowest(_user(res), "healthy")[2] == ec.FAILS
    res = _with(monkeypatch, *[{"mp": 0.0425}] * 2, {"mp": np.nan})  # one never got a subflow
    assert esim.multipath_slowest(_user(res), "healthy")[2] == ec.FAILS
    # loss: the median over enough runs (a lost SYN waits for the 1 s retransmission)
    lossy = [{"condition": "lossy10", "mp": 0.042}] * 4 + [{"condition": "lossy10", "mp": 1.03}]
    assert esim.multipath_slowest(_user(_with(monkeypatch, *lossy)), "lossy10")[2] == ec.HOLDS
    assert esim.multipath_slowest(_user(_with(monkeypatch, *lossy[3:])), "lossy10")[2] == ec.NOT_MEASURED
    slow = [{"condition": "lossy10", "mp": 1.03}] * 3 + lossy[:2]
    assert esim.multipath_slowest(_user(_with(monkeypatch, *slow)), "lossy10")[2] == ec.FAILS


def test_sim_multipath_waits_rfc8684s_extra_rtt(monkeypatch):
    # setup 21 ms (wifi) + RTT(wifi) 20 ms + MP_JOIN on lte 40 ms = 81 ms
    res = _with(monkeypatch, *[{"strategy": "sim", "mp": 0.0825}] * 3, {"strategy": "sim", "mp": 0.100})
    assert esim.multipath_rfc8684(_user(res), "healthy")[2] == ec.HOLDS   # the median: one late run is noise
    res = _with(monkeypatch, *[{"strategy": "sim", "mp": 0.0825}] * 2, *[{"strategy": "sim", "mp": 0.100}] * 2)
    assert esim.multipath_rfc8684(_user(res), "healthy")[2] == ec.FAILS
    res = _with(monkeypatch, *[{"strategy": "sim", "mp": 0.0825}] * 2, {"strategy": "sim", "mp": np.nan})
    assert esim.multipath_rfc8684(_user(res), "healthy")[2] == ec.FAILS   # a run without multipath
    lossy = [{"condition": "lossy10", "strategy": "sim", "mp": 0.0825}] * 2
    res = _with(monkeypatch, *lossy, {"condition": "lossy10", "strategy": "sim", "mp": np.nan})
    assert esim.multipath_rfc8684(_user(res), "lossy10")[2] == ec.HOLDS   # loss: half the runs suffice
    res = _with(monkeypatch, lossy[0], *[{"condition": "lossy10", "strategy": "sim", "mp": np.nan}] * 2)
    assert esim.multipath_rfc8684(_user(res), "lossy10")[2] == ec.FAILS
    res = _with(monkeypatch, {"strategy": "sim", "mp": 0.0430})   # faster than RFC 8684 allows: a wrong stamp
    assert esim.multipath_rfc8684(_user(res), "healthy")[2] == ec.FAILS


def test_esim_session_setup_guaranteed(monkeypatch):
    runs = [{"condition": c} for c in CHANGES]
    assert esim._guaranteed(_user(_with(monkeypatch, *runs)), "esim")[2] == ec.HOLDS
    runs[2] = {"condition": "blackhole", "setup": np.nan, "outcome": "failed"}
    assert esim._guaranteed(_user(_with(monkeypatch, *runs)), "esim")[2] == ec.FAILS


def test_esim_against_a_kernel_server_falls_back_to_sim(monkeypatch):
    k = {"server": "kernel", "fallback": True}
    res = _with(monkeypatch, k, {**k, "condition": "blackhole"}, {"strategy": "sim", "server": "kernel"},
                {"esim_subflows": 1})   # a user-server run: not this cell
    assert esim.falls_back(ec.Establishment(res, "user", "kernel"))[2] == ec.HOLDS
    res = _with(monkeypatch, k, {"server": "kernel", "fallback": False})
    assert esim.falls_back(ec.Establishment(res, "user", "kernel"))[2] == ec.FAILS
    res = _with(monkeypatch, k, {**k, "esim_subflows": 1})
    assert esim.falls_back(ec.Establishment(res, "user", "kernel"))[2] == ec.FAILS


def test_user_stack_and_kernel_socket_robe_within_a_millisecond(monkeypatch):
    def both(user_setup: float, user_mp: float = 0.083) -> list[dict]:
        kernel = [{"strategy": "sim", "client": "kernel", "server": "kernel", "setup": 0.0202,
                   "mp_server": 0.0824}] * 3   # kernel runs have multipath_s only: the same stamp
        user = [{"strategy": "sim", "server": "kernel", "setup": user_setup, "mp": user_mp, "mp_server": 0.121}] * 3
        return kernel + user
    cmp = esim.stack_comparison(_with(monkeypatch, *both(0.0206)))
    assert cmp["multipath_diff_ms"].round(1).tolist() == [0.6]
    assert esim.stacks_agree(cmp, "sim")[2] == ec.HOLDS
    assert esim.stacks_agree(cmp, "timer")[2] == ec.NOT_MEASURED
    cmp = esim.stack_comparison(_with(monkeypatch, *both(0.0235)))
    assert esim.stacks_agree(cmp, "sim")[2] == ec.FAILS
    runs = both(0.0206)
    runs[-1] = {**runs[-1], "setup": np.nan, "outcome": "failed"}   # one user-stack run did not connect
    assert esim.stacks_agree(esim.stack_comparison(_with(monkeypatch, *runs)), "sim")[2] == ec.FAILS


def test_esim_runs_name_their_choices_in_the_manifest():
    from experiments.establishment import Params, esim_protocol

    assert esim_protocol(Params(strategy="sim")) == {}   # kernel MPTCP alone chooses nothing open
    p = esim_protocol(Params(strategy="esim", client_stack="user", server_stack="kernel"))["robe_esim"]
    assert (p["hash"], p["hmac_key"], p["crc"], p["crc_bits"]) == ("hmac-sha256/64", "winner-keys",
                                                                  "crc16-ccitt-false", 10)
    assert p["options"]["MP_JOIN_CAP"] == {"kind": 30, "subtype": 0xF, "nibble": 1, "length": 20}
    assert p["options"]["ROBE_eSIM_EN"]["flag"] == 0x04 and (p["client"], p["server"]) == (True, False)
    assert esim_protocol(Params(strategy="sim", client_stack="user", server_stack="user"))["robe_esim"]["server"]


def test_a_kernel_only_fallback_to_tcp_is_named(monkeypatch):
    # behind a middlebox dropping MPTCP SYNs, Linux falls back to TCP; the user stack does not
    runs = [{"condition": "mptcp_drop", "strategy": "mptcp", "client": "kernel", "server": "kernel",
             "setup": 3.08, "outcome": "fallback"}] * 2 + \
        [{"condition": "mptcp_drop", "strategy": "mptcp", "server": "kernel", "setup": np.nan,
          "outcome": "failed"}] * 2
    _, meas, verdict = esim.stacks_agree(esim.stack_comparison(_with(monkeypatch, *runs)), "mptcp")
    assert verdict == ec.FAILS and "2 fell back to TCP on kernel" in meas and "vs n/a;" in meas, meas
