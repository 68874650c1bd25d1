"""Client TLS options for outbound sessions, per policy.

``may`` and ``encrypt`` do not check certificates (most MX certificates would
fail, RFC 7435); ``verify`` checks the chain against the trust roots (a PEM
file, or the system's) and the host name with service-identity.
"""

from __future__ import annotations

import re

from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from gateway.smtp.client import TlsPolicy

TlsOptions = IOpenSSLClientConnectionCreator | ssl.CertificateOptions

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def load_trust_roots(path: str) -> IOpenSSLTrustRoot:
    """The certificates of a PEM file as trust roots; the system's if `path` is ""."""
    if not path:
        return ssl.platformTrust()  # type: ignore[no-untyped-call,no-any-return]
    with open(path, "rb") as pem:
        blocks = _PEM_CERTIFICATE.findall(pem.read())
    if not blocks:
        raise ValueError(f"{path}: no PEM certificate found; give a CA bundle or leave it empty")
    certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    return ssl.trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call,no-any-return]


class ClientTls:
    """Makes (and keeps) the TLS options the client sessions use."""

    def __init__(self, ca_file: str = "") -> None:
        self.ca_file = ca_file
        self._trust: IOpenSSLTrustRoot | None = None
        self._unverified: ssl.CertificateOptions | None = None
        self._verified: dict[str, IOpenSSLClientConnectionCreator] = {}

    def options(self, policy: TlsPolicy, hostname: str) -> TlsOptions | None:
        if policy is TlsPolicy.NONE:
            return None
        if policy is TlsPolicy.VERIFY:
            options = self._verified.get(hostname)
            if options is None:
                if self._trust is None:
                    self._trust = load_trust_roots(self.ca_file)
                if len(self._verified) > 1000:
                    self._verified.clear()
                options = ssl.optionsForClientTLS(hostname, trustRoot=self._trust)
                self._verified[hostname] = options
            return options
        if self._unverified is None:
            self._unverified = ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        return self._unverified
