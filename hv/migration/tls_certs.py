"""Throwaway X.509 certificates for TLS migration: ``hv bench migrate --tls`` and the tests.

Made with the ``openssl`` command-line tool (the ``cryptography`` package is not a
dependency of hv, and adding it for throwaway certificates is not worth it; ``openssl``
is on every Debian base image). EC P-256 keys: generated in milliseconds. Files are
written under QEMU's names (ca-cert.pem, server-cert.pem, ...), valid for two days:
never use them for anything but a measurement or a test.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

OPENSSL_MISSING = "openssl not installed (apt-get install openssl)"


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> Path:
    """A CA (ca.key, ca-cert.pem) in ``directory``; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "ca.key", "-out", "ca-cert.pem", "-days", "2", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         cwd=directory)
    return directory


def issue(ca: Path, out: Path, role: str, common_name: str, san: str = "") -> None:
    """``out/{role}-cert.pem`` and ``out/{role}-key.pem`` signed by the CA in ``ca``, and a
    copy of that CA's certificate as ``out/ca-cert.pem`` unless one is there already."""
    out.mkdir(parents=True, exist_ok=True)
    key, csr, cert = out / f"{role}-key.pem", out / f"{role}.csr", out / f"{role}-cert.pem"
    _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}", cwd=out)
    usage = "serverAuth" if role == "server" else "clientAuth"
    ext = out / f"{role}.ext"
    ext.write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n"
                   + (f"subjectAltName={san}\n" if san else ""))
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca / "ca-cert.pem"), "-CAkey", str(ca / "ca.key"),
         "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=out)
    if not (out / "ca-cert.pem").exists():
        shutil.copy(ca / "ca-cert.pem", out / "ca-cert.pem")


def server_and_client(base: Path, san: str = "DNS:localhost,IP:127.0.0.1,IP:::1") -> tuple[Path, Path]:
    """One CA; a server directory and a client directory, both trusting it."""
    ca = make_ca(base / "ca", "hv test CA")
    server, client = base / "server", base / "client"
    issue(ca, server, "server", "localhost", san)
    issue(ca, client, "client", "hv-source")
    return server, client
