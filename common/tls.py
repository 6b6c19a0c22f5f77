"""TLS for the coordinator's port: credentials from PEM files, and handshake failures in words.

    threepc serve CONFIG --tls-cert cert.pem --tls-key key.pem
    threepc worker --coordinator HOST:PORT --tls-ca ca.pem   # HOST must be named in cert.pem
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

from threepc.common.errors import ConfigError, TransportError


def _read(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot be read: {err.strerror or err}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} {path}: not a PEM file (no -----BEGIN line)")
    return data


def server_credentials(cert_file: str | Path, key_file: str | Path) -> grpc.ServerCredentials:
    """The coordinator's certificate chain and private key (PEM)."""
    return grpc.ssl_server_credentials([(_read(key_file, "--tls-key"), _read(cert_file, "--tls-cert"))])


def channel_credentials(ca_file: str | Path) -> grpc.ChannelCredentials:
    """Trust the coordinator certificates signed by the CA in `ca_file` (PEM)."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca_file, "--tls-ca"))


def _san(address: str) -> str:
    """The subjectAltName entry that names the host of HOST:PORT (or [V6]:PORT)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"DNS:{host}"
    return f"IP:{host}"


# Words gRPC (BoringSSL) uses when the TLS handshake fails, and what they mean to a user.
_HANDSHAKE = ("ssl", "handshake", "certificate", "tsi_", "hostname verification", "alpn")


def handshake_failure(details: str, address: str, tls: bool) -> TransportError | None:
    """A one-line error if `details` (a failed call's) says the TLS handshake failed, else None."""
    lowered = details.lower()
    if not any(word in lowered for word in _HANDSHAKE):
        return None
    if not tls:
        return TransportError(f"{address} speaks TLS: give the worker --tls-ca with the CA that signed its certificate")
    if "wrong_version_number" in lowered:
        why = "the coordinator does not serve TLS (start it with --tls-cert and --tls-key, or drop --tls-ca)"
    elif "hostname" in lowered:
        why = (f"the coordinator's certificate does not name the host in {address}: its subjectAltName "
               f"must list {_san(address)} (reissue it with that name, or dial a name it lists)")
    else:
        why = "the coordinator's certificate is not signed by the CA given with --tls-ca, or names another host"
    return TransportError(f"TLS handshake with {address} failed: {why}")
