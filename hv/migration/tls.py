"""TLS for migration channels, configured QEMU's way.

Credentials are QEMU's ``tls-creds-x509`` objects (``-object tls-creds-x509,id=ID,
endpoint=server|client,dir=DIR[,verify-peer=on|off]`` or QMP ``object-add``); DIR holds
QEMU's file names: ``ca-cert.pem`` always, ``server-cert.pem``/``server-key.pem`` for a
server endpoint, ``client-cert.pem``/``client-key.pem`` for a client (optional for a
client, needed when the server verifies its peer). ``migrate-set-parameters
{"tls-creds": ID, "tls-hostname": NAME}`` turns TLS on for both ends of a migration.

As in QEMU, a server endpoint verifies its peer by default (``verify-peer=on``): the
source must present a certificate signed by ``ca-cert.pem``. A client always checks the
server certificate against ``ca-cert.pem`` and the host name (``tls-hostname``, else the
host of the URI; for ``unix:`` URIs a ``tls-hostname`` is needed, as in QEMU), unless the
client object says ``verify-peer=off``.

The files are read when a connection is made, not when the object is created (QEMU reads
them at creation; reading late means a renewed certificate is used without re-adding the
object, and a missing file is reported by the migration that needs it).

Session tickets are turned off (``num_tickets = 0``): a TLS 1.3 server sends them after
the handshake, and the source would see those records as "the destination spoke" while
it streams. Data decrypted but not yet read sits inside the SSL object, where select()
cannot see it: readers check :func:`has_pending` first.
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Literal, cast

from hv.errors import MigrationError
from hv.textsafe import printable

log = logging.getLogger(__name__)

TYPE = "tls-creds-x509"
CA_CERT = "ca-cert.pem"
HANDSHAKE_TIMEOUT = 10.0
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


class TlsConfigError(MigrationError, ValueError):
    """A tls-creds-x509 object or TLS parameter is malformed; the message says which part."""


class TlsHandshakeError(MigrationError):
    """The TLS handshake failed (peer not trusted, wrong host name, not TLS at all...)."""


@dataclass(frozen=True)
class TlsCreds:
    """One ``tls-creds-x509`` object."""

    id: str
    endpoint: Literal["server", "client"]
    dir: str
    verify_peer: bool

    def to_qmp(self) -> dict[str, Any]:
        return {"qom-type": TYPE, "id": self.id, "endpoint": self.endpoint, "dir": self.dir,
                "verify-peer": self.verify_peer}


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise TlsConfigError(f"{what}: expected on or off, got {printable(str(value))!r}")


def make_creds(props: dict[str, Any]) -> TlsCreds:
    """Build a TlsCreds from ``-object``/``object-add`` properties (``qom-type`` removed).

    Unknown properties, a missing or bad ``id``/``endpoint``/``dir`` raise TlsConfigError.
    """
    known = {"id", "endpoint", "dir", "verify-peer"}
    unknown = sorted(set(props) - known)
    if unknown:
        raise TlsConfigError(f"{TYPE}: unknown property {printable(unknown[0])!r} "
                             f"(known: {', '.join(sorted(known))})")
    ident = props.get("id")
    if not isinstance(ident, str) or not ident or not set(ident) <= _ID_CHARS or not ident[0].isalpha():
        raise TlsConfigError(f"{TYPE}: 'id' must start with a letter and use letters, digits, '-', '.', '_'")
    endpoint = props.get("endpoint", "client")
    if endpoint not in ("server", "client"):
        raise TlsConfigError(f"{TYPE} {ident}: endpoint must be server or client, got {printable(str(endpoint))!r}")
    directory = props.get("dir")
    if not isinstance(directory, str) or not directory or "\x00" in directory:
        raise TlsConfigError(f"{TYPE} {ident}: 'dir' (the certificate directory) is required")
    verify = _bool(props.get("verify-peer", True), f"{TYPE} {ident}: verify-peer")
    return TlsCreds(ident, endpoint, directory, verify)


class TlsObjects:
    """The tls-creds-x509 objects of one hv process, by id."""

    def __init__(self, initial: tuple[TlsCreds, ...] = ()) -> None:
        self._objects: dict[str, TlsCreds] = {}
        for creds in initial:
            self.add(creds)

    def add(self, creds: TlsCreds) -> None:
        if creds.id in self._objects:
            raise TlsConfigError(f"attempt to add duplicate object id '{creds.id}'")
        self._objects[creds.id] = creds

    def remove(self, ident: str) -> None:
        if ident not in self._objects:
            raise TlsConfigError(f"object '{printable(ident)}' not found")
        del self._objects[ident]

    def get(self, ident: str) -> TlsCreds:
        creds = self._objects.get(ident)
        if creds is None:
            raise TlsConfigError(f"No TLS credentials with id '{printable(ident)}'")
        return creds


def _path(creds: TlsCreds, name: str) -> str:
    return os.path.join(creds.dir, name)


def _load(context: ssl.SSLContext, creds: TlsCreds, cert: str | None, key: str | None) -> None:
    """CA (always) and our own certificate/key; a missing or bad file names itself."""
    current = _path(creds, CA_CERT)
    try:
        context.load_verify_locations(cafile=current)
        if cert is not None and key is not None:
            current = f"{_path(creds, cert)} / {key}"
            context.load_cert_chain(_path(creds, cert), _path(creds, key))
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TlsConfigError(f"TLS credentials '{creds.id}': cannot load {current}: {reason}") from None


def server_context(creds: TlsCreds) -> ssl.SSLContext:
    """The destination's context: its certificate, and (verify-peer=on) a required client
    certificate signed by the CA."""
    if creds.endpoint != "server":
        raise TlsConfigError(f"TLS credentials '{creds.id}' are for a client endpoint, "
                             "the destination needs endpoint=server")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.num_tickets = 0
    _load(context, creds, "server-cert.pem", "server-key.pem")
    context.verify_mode = ssl.CERT_REQUIRED if creds.verify_peer else ssl.CERT_NONE
    return context


def client_context(creds: TlsCreds) -> ssl.SSLContext:
    """The source's context: checks the server's certificate and host name (verify-peer=on),
    presents client-cert.pem when the directory has one."""
    if creds.endpoint != "client":
        raise TlsConfigError(f"TLS credentials '{creds.id}' are for a server endpoint, "
                             "the source needs endpoint=client")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    have_cert = os.path.exists(_path(creds, "client-cert.pem"))
    _load(context, creds, "client-cert.pem" if have_cert else None, "client-key.pem" if have_cert else None)
    if not creds.verify_peer:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _handshake_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError):
        return f"no TLS handshake within {HANDSHAKE_TIMEOUT:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__


def wrap_server(sock: socket.socket, creds: TlsCreds) -> ssl.SSLSocket:
    """The destination's TLS handshake on an accepted connection (bounded in time).

    On failure the connection is closed and TlsHandshakeError says why in one line (a
    plain source shows up as "not TLS", an untrusted one as its verification error).
    """
    try:
        context = server_context(creds)
    except TlsConfigError:
        sock.close()
        raise
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        tls = context.wrap_socket(sock, server_side=True)
    except (OSError, ValueError) as exc:
        sock.close()
        reason = _handshake_reason(exc)
        if isinstance(exc, ssl.SSLError) and exc.reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST",
                                                              "UNEXPECTED_RECORD", "RECORD_LAYER_FAILURE"):
            reason = f"the source does not speak TLS ({exc.reason})"
        raise TlsHandshakeError(f"TLS handshake with the source failed: {printable(reason)}") from None
    tls.settimeout(None)
    log.info("incoming migration: %s with the source (%s)", tls.version(), _peer_subject(tls))
    return tls


def _peer_subject(tls: ssl.SSLSocket) -> str:
    cert = tls.getpeercert() or {}
    # getpeercert()'s subject is a tuple of RDNs, each a tuple of (key, value) pairs
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", cert.get("subject", ()))
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    return printable(f"certificate CN={names[0]}") if names else "no client certificate"


def wrap_client(sock: socket.socket, creds: TlsCreds, hostname: str | None) -> ssl.SSLSocket:
    """The source's TLS handshake; the server certificate must match ``hostname``."""
    try:
        context = client_context(creds)
    except TlsConfigError:
        sock.close()
        raise
    if context.check_hostname and not hostname:
        sock.close()
        raise TlsConfigError("TLS needs a host name to check the destination's certificate "
                             "(set tls-hostname)")
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        tls = context.wrap_socket(sock, server_side=False, server_hostname=hostname or None)
    except (OSError, ValueError) as exc:
        sock.close()
        raise TlsHandshakeError(f"TLS handshake with the destination failed: "
                                f"{printable(_handshake_reason(exc))}") from None
    tls.settimeout(None)
    log.info("migration: %s with the destination (%s)", tls.version(), _peer_subject(tls))
    return tls


def has_pending(sock: Any) -> bool:
    """True when a TLS socket holds decrypted bytes not read yet (select() cannot see them)."""
    pending = getattr(sock, "pending", None)
    return bool(pending is not None and pending())
