"""Throwaway X.509 certificates for the TLS migration tests: the helpers live in
:mod:`hv.migration.tls_certs` (``hv bench migrate --tls`` uses them too)."""
from __future__ import annotations

from hv.migration.tls_certs import OPENSSL_MISSING, have_openssl, issue, make_ca, server_and_client

__all__ = ["OPENSSL_MISSING", "have_openssl", "issue", "make_ca", "server_and_client"]
