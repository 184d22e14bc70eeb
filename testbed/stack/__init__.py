"""A user-space MPTCP v1 (RFC 8684) endpoint that interoperates with Linux kernel MPTCP.

Layers, bottom up: crypto (keys, HMAC, checksums), options (the kind-30 codec),
packet (IPv4/TCP codec), attach (getting packets in and out of a namespace
without the kernel's TCP answering), tcp (one subflow), mptcp (the connection
and the stack's API). Imports only the standard library.
"""
