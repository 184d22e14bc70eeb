"""What Linux's TCP and MPTCP do on their own with default sysctls, as numbers
the project relies on (measured on the wire here; see docs and the report).

Used by RobE's timer (its default is the kernel's own initial SYN RTO) and by
the analysis that judges establishment runs against the kernel's SYN schedule.
"""
from __future__ import annotations

# When SYNs leave on a path that never answers, in seconds after connect():
# tcp_syn_linear_timeouts=4 keeps the first retransmissions 1 s apart, then
# they back off exponentially up to tcp_syn_retries=6.
SYN_SCHEDULE_S = (0, 1, 2, 3, 4, 5, 7, 11, 19, 35, 67)
# connect() gives up here (ETIMEDOUT) when nothing ever answers.
SYN_GIVEUP_S = 133.7
# The initial SYN retransmission timeout (RFC 6298 2.1): the first retransmission.
INITIAL_SYN_RTO_S = float(SYN_SCHEDULE_S[1])
# Linux's lower bound on any TCP RTO (TCP_RTO_MIN).
TCP_RTO_MIN_S = 0.2
# SYNs that carry MP_CAPABLE before the kernel falls back to plain TCP
# (net.mptcp.syn_retrans_before_tcp_fallback=2: the first SYN and two retransmissions).
MPTCP_SYNS_BEFORE_FALLBACK = 3
# When the first plain-TCP SYN leaves.
FALLBACK_S = float(SYN_SCHEDULE_S[MPTCP_SYNS_BEFORE_FALLBACK])
