"""MPTCP keys from a TLS exporter (docs/privacy.md): a TLS handshake over the
first subflow of a user-space stack connection, then both ends take their
MPTCP keys from the exporter (label "EXPORTER-MPTCP", 16 bytes: the client's
key, then the server's; draft-paasch-mptcp-tls-authentication-00) and
`Connection.rekey()` them. The keys sent in MP_CAPABLE are then single-use:
an observer who saw them cannot compute the token a later MP_JOIN names.

TLS comes from pyOpenSSL (Debian python3-openssl; Python's ssl module has no
keying-material exporter), driven through memory BIOs over the connection's
send/recv. The server certificate is a throwaway self-signed one: the
experiment measures what passive observers learn, not authentication.
"""
from __future__ import annotations

import datetime
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from testbed.stack import Connection, StackError

LABEL = b"EXPORTER-MPTCP"
READY = b"K"  # the server's first application byte: it has rekeyed, joins may come


def _self_signed() -> tuple[crypto.PKey, crypto.X509]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mptcp-testbed")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return crypto.PKey.from_cryptography_key(key), crypto.X509.from_cryptography(cert)


def context(server: bool) -> SSL.Context:
    """A TLS 1.3 context (the server's with a fresh self-signed certificate)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    if server:
        key, cert = _self_signed()
        ctx.use_privatekey(key)
        ctx.use_certificate(cert)
    return ctx


def _flush(tls: SSL.Connection, conn: Connection, timeout: float) -> None:
    while True:
        try:
            out = tls.bio_read(65536)
        except SSL.WantReadError:
            return
        if not out:
            return
        conn.send(out, timeout=timeout)


def _feed(tls: SSL.Connection, conn: Connection, deadline: float) -> None:
    data = conn.recv(65536, timeout=max(0.1, deadline - time.monotonic()))
    if not data:
        raise StackError("peer closed the connection during the TLS exchange")
    tls.bio_write(data)


def secure(conn: Connection, server: bool, ctx: SSL.Context | None = None,
           timeout: float = 10.0) -> SSL.Connection:
    """TLS handshake over conn, then conn.rekey() with the exporter's keys. The
    client returns once the server said it rekeyed (so a join it opens next
    names a token the server knows). StackError on failure."""
    deadline = time.monotonic() + timeout
    tls = SSL.Connection(ctx or context(server), None)
    tls.set_accept_state() if server else tls.set_connect_state()
    while True:
        try:
            tls.do_handshake()
            break
        except SSL.WantReadError:
            _flush(tls, conn, timeout)
            _feed(tls, conn, deadline)
        except SSL.Error as exc:
            raise StackError(f"TLS handshake failed: {exc}") from None
    _flush(tls, conn, timeout)
    material = tls.export_keying_material(LABEL, 16)
    key_client, key_server = int.from_bytes(material[:8], "big"), int.from_bytes(material[8:], "big")
    if server:
        conn.rekey(key_server, key_client)
        tls.write(READY)
        _flush(tls, conn, timeout)
        return tls
    conn.rekey(key_client, key_server)
    while True:  # records before READY (session tickets) are consumed here
        try:
            if tls.read(1) == READY:
                return tls
        except SSL.WantReadError:
            _feed(tls, conn, deadline)
        except SSL.Error as exc:
            raise StackError(f"TLS after the handshake: {exc}") from None
