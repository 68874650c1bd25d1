"""The server certificate for STARTTLS: the configured one, or a self-signed one.

With no certificate configured the gateway makes a self-signed certificate for
its hostname in `state_dir/tls/` at first start (as Debian does with its
"snakeoil" certificate), so STARTTLS, and AUTH over it, work out of the box.
Internet senders do not verify MX certificates in practice; an administrator
who wants a real one sets `[tls] certificate` and `private_key`.
"""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot

from gateway.config import ConfigError, TlsConfig


def self_signed_pem(hostname: str) -> tuple[bytes, bytes]:
    """A new self-signed certificate for `hostname`, and its key: (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def make_self_signed(hostname: str, directory: str) -> tuple[str, str]:
    """Write a self-signed certificate and key for `hostname` (once); return their paths."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert_path = os.path.join(directory, "selfsigned.pem")
    key_path = os.path.join(directory, "selfsigned.key")
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path
    cert_pem, key_pem = self_signed_pem(hostname)
    fd = os.open(key_path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    os.replace(key_path + ".tmp", key_path)
    with open(cert_path + ".tmp", "wb") as handle:
        handle.write(cert_pem)
    os.replace(cert_path + ".tmp", cert_path)
    return cert_path, key_path


def server_context(settings: TlsConfig, hostname: str, state_dir: str) -> ssl.CertificateOptions:
    """The STARTTLS context for the SMTP listeners (TLS 1.2 or later)."""
    cert_path, key_path = settings.certificate, settings.private_key or settings.certificate
    if not cert_path:
        cert_path, key_path = make_self_signed(hostname, os.path.join(state_dir, "tls"))
    try:
        with open(cert_path, "rb") as handle:
            cert_pem = handle.read()
        with open(key_path, "rb") as handle:
            key_pem = handle.read()
    except OSError as error:
        raise ConfigError(
            "[tls]", "tls.certificate", f"cannot read {error.filename}: {error.strerror}"
        ) from None
    try:
        private = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)  # type: ignore[no-untyped-call]
        chain = [ssl.Certificate.loadPEM(block).original for block in _pem_blocks(cert_pem)[1:]]
    except Exception as error:  # pyOpenSSL raises several kinds for bad PEM
        raise ConfigError(
            "[tls]", "tls.certificate", f"{cert_path}: not a usable PEM certificate and key: {error}"
        ) from None
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=chain or None,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def _pem_blocks(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [block + marker for block in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]


def trust_root(settings: TlsConfig) -> IOpenSSLTrustRoot:
    """Trust roots for verifying the servers we deliver to."""
    if not settings.ca_file:
        return ssl.platformTrust()  # type: ignore[no-untyped-call,no-any-return]
    with open(settings.ca_file, "rb") as handle:
        pem = handle.read()
    certs = [ssl.Certificate.loadPEM(block) for block in _pem_blocks(pem)]
    if not certs:
        raise ConfigError("[tls]", "tls.ca_file", f"{settings.ca_file} holds no PEM certificate")
    return ssl.trustRootFromCertificates(certs)  # type: ignore[no-untyped-call,no-any-return]
