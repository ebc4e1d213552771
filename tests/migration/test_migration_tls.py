"""TLS migration QEMU's way, through real hv processes on 127.0.0.1: ``-object
tls-creds-x509`` / QMP ``object-add``, ``migrate-set-parameters tls-creds/tls-hostname``,
``-incoming defer`` + ``migrate-incoming`` on the destination (as libvirt drives QEMU).

Certificates are made per test with the openssl CLI (tests/tls_certs.py says why).
A TLS destination refuses a plain source and a source whose client certificate another
CA signed, runs nothing, says so in one stderr line and, as QEMU does, keeps waiting for
a proper source; a source that does not trust the server certificate (other CA, or not
issued for tls-hostname) fails with a clear error-desc and its guest keeps running.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import Vm, check_dirty_output, complete_lines
from tests.tls_certs import OPENSSL_MISSING, have_openssl, issue, make_ca, server_and_client

pytestmark = pytest.mark.skipif(not have_openssl(), reason=OPENSSL_MISSING)
MIB = 4
REFUSED = "incoming migration: TLS handshake with the source failed"


@pytest.fixture
def vms(vms: Callable[..., Vm]) -> Callable[..., Vm]:
    """The group's ``vms`` with this file's guest: the dirty guest over MIB MiB."""
    return functools.partial(vms, mib=MIB)


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    return server_and_client(tmp_path / "pki")


def tls_destination(vms, server_dir: Path) -> tuple[Vm, str]:
    dst = vms("dst", "-incoming", "defer",
              "-object", f"tls-creds-x509,id=tls0,endpoint=server,dir={server_dir}")
    assert dst.execute("migrate-set-parameters", **{"tls-creds": "tls0"}) == {"return": {}}
    assert dst.execute("migrate-incoming", uri="tcp:127.0.0.1:0") == {"return": {}}
    return dst, dst.incoming_address()


def tls_source(vms, name: str, client_dir: Path, hostname: str = "") -> Vm:
    src = vms(name)
    assert src.execute("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "client",
                                       "dir": str(client_dir)}) == {"return": {}}
    params = {"tls-creds": "tls0", **({"tls-hostname": hostname} if hostname else {})}
    assert src.execute("migrate-set-parameters", **params) == {"return": {}}
    return src


def wait_stderr(vm: Vm, needle: str, count: int = 1) -> str:
    import time
    deadline = time.monotonic() + 30
    while vm.stderr().count(needle) < count:
        assert time.monotonic() < deadline, vm.stderr()[-2000:]
        time.sleep(0.02)
    return vm.stderr()


def test_tls_destination_refuses_plain_and_foreign_sources_then_migrates(vms, certs, tmp_path):
    server_dir, client_dir = certs
    dst, address = tls_destination(vms, server_dir)
    assert dst.execute("query-migrate-parameters")["return"]["tls-creds"] == "tls0"

    # A plain source: refused, nothing runs on the destination, it keeps waiting.
    plain = vms("plain")
    plain.wait_lines(2)
    plain.execute("migrate", uri=address)
    assert plain.wait_migration()["status"] == "failed"
    err = wait_stderr(dst, REFUSED)
    assert "the source does not speak TLS" in err
    assert dst.execute("query-status")["return"]["status"] == "inmigrate"
    assert dst.execute("query-migrate")["return"]["status"] == "setup"
    assert plain.execute("query-status")["return"]["status"] == "running"

    # A client certificate another CA signed (it trusts the right CA for the server).
    other_ca = make_ca(tmp_path / "other-ca", "other CA")
    foreign = tmp_path / "foreign"
    issue(other_ca, foreign, "client", "intruder")
    (foreign / "ca-cert.pem").write_bytes((client_dir / "ca-cert.pem").read_bytes())
    intruder = tls_source(vms, "intruder", foreign)
    intruder.wait_lines(2)
    intruder.execute("migrate", uri=address)
    assert intruder.wait_migration()["status"] == "failed"
    err = wait_stderr(dst, REFUSED, 2)
    assert "TLS handshake with the source failed: unable to get local issuer certificate" in err, err[-800:]
    assert dst.execute("query-status")["return"]["status"] == "inmigrate"
    assert dst.output() == ""
    assert intruder.execute("query-status")["return"]["status"] == "running"

    # The proper source: an encrypted migration completes and the guest goes on.
    src = tls_source(vms, "src", client_dir)
    src.wait_lines(3)
    assert src.execute("migrate", uri=address) == {"return": {}}
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    assert "TLSv1.3 with the source (certificate CN=hv-source)" in dst.stderr()
    assert "with the destination (certificate CN=localhost)" in src.stderr()
    assert dst.execute("query-status")["return"]["status"] == "running"
    dst.wait_lines(len(complete_lines(dst.output())) + 2)
    dst.execute("stop")
    assert check_dirty_output("q35", MIB, src.output() + dst.output()) > 2


@pytest.mark.parametrize("case", ["other-ca", "hostname"])
def test_source_refuses_untrusted_destination_and_keeps_running(vms, certs, tmp_path, case):
    server_dir, client_dir = certs
    if case == "other-ca":   # the destination's certificate comes from a CA the source does not trust
        other_ca = make_ca(tmp_path / "other-ca", "other CA")
        server_dir = tmp_path / "rogue"
        issue(other_ca, server_dir, "server", "localhost", "DNS:localhost,IP:127.0.0.1")
        # OpenSSL names it by what the server sent: its certificate alone, or with its CA
        hostname, expected = "", ("TLS handshake with the destination failed: unable to get local issuer certificate",
                                  "TLS handshake with the destination failed: self-signed certificate in certificate chain")
    else:
        hostname, expected = "db.example", ("TLS handshake with the destination failed: Hostname mismatch",)
    dst, address = tls_destination(vms, server_dir)
    src = tls_source(vms, "src", client_dir, hostname)
    assert src.execute("query-migrate-parameters")["return"]["tls-hostname"] == hostname
    src.wait_lines(2)
    reply = src.execute("migrate", uri=address)
    assert reply["error"]["desc"].startswith(expected), reply
    status = src.wait_migration()
    assert status["status"] == "failed" and status["error-desc"].startswith(expected), status
    assert src.execute("query-status")["return"]["status"] == "running"
    lines = len(complete_lines(src.output()))
    src.wait_lines(lines + 1)   # the source's guest goes on
    wait_stderr(dst, REFUSED)
    assert dst.execute("query-status")["return"]["status"] == "inmigrate"


def test_object_add_and_parameters_are_checked(vms, certs):
    vm = vms("vm", "-S")
    bad = vm.execute("object-add", **{"qom-type": "secret", "id": "s0"})
    assert "unsupported qom-type 'secret'" in bad["error"]["desc"]
    bad = vm.execute("object-add", **{"qom-type": "tls-creds-x509", "id": "t0", "endpoint": "peer", "dir": "/x"})
    assert "endpoint must be server or client" in bad["error"]["desc"]
    ok = {"qom-type": "tls-creds-x509", "id": "t0", "endpoint": "client", "dir": str(certs[1])}
    assert vm.execute("object-add", **ok) == {"return": {}}
    assert "duplicate object id 't0'" in vm.execute("object-add", **ok)["error"]["desc"]
    assert vm.execute("migrate-set-parameters", **{"tls-creds": "nope"}) == {"return": {}}
    reply = vm.execute("migrate", uri="tcp:127.0.0.1:1")
    assert "No TLS credentials with id 'nope'" in reply["error"]["desc"] or "cannot connect" in reply["error"]["desc"]
    assert vm.execute("object-del", id="t0") == {"return": {}}
    assert "object 't0' not found" in vm.execute("object-del", id="t0")["error"]["desc"]
    assert vm.execute("migrate-set-parameters", **{"tls-creds": ""}) == {"return": {}}
    assert vm.execute("query-migrate-parameters")["return"]["tls-creds"] == ""


def test_tls_over_unix_needs_a_hostname_then_migrates(vms, certs, tmp_path):
    """Over a unix socket there is no host to check the certificate against: as in QEMU,
    the source needs ``tls-hostname``; without it the migration fails with that reason
    (the destination runs nothing), with it an encrypted migration completes."""
    server_dir, client_dir = certs
    path = tmp_path / "mig.sock"
    dst = vms("dst", "-incoming", "defer",
              "-object", f"tls-creds-x509,id=tls0,endpoint=server,dir={server_dir}")
    assert dst.execute("migrate-set-parameters", **{"tls-creds": "tls0"}) == {"return": {}}
    assert dst.execute("migrate-incoming", uri=f"unix:{path}") == {"return": {}}

    nameless = tls_source(vms, "nameless", client_dir)
    nameless.wait_lines(2)
    reply = nameless.execute("migrate", uri=f"unix:{path}")
    status = reply.get("error", {}).get("desc") or nameless.wait_migration().get("error-desc", "")
    assert "TLS needs a host name to check the destination's certificate (set tls-hostname)" in status, reply
    assert nameless.execute("query-status")["return"]["status"] == "running"
    assert dst.execute("query-status")["return"]["status"] == "inmigrate"
    assert dst.output() == ""

    src = tls_source(vms, "src", client_dir, "localhost")
    src.wait_lines(3)
    assert src.execute("migrate", uri=f"unix:{path}") == {"return": {}}
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    assert "TLSv1.3 with the source (certificate CN=hv-source)" in dst.stderr()
    assert dst.execute("query-status")["return"]["status"] == "running"
    dst.wait_lines(len(complete_lines(dst.output())) + 2)
    dst.execute("stop")
    assert check_dirty_output("q35", MIB, src.output() + dst.output()) > 2
