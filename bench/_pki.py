"""A throw-away certificate authority: the TLS benchmark (``python -m bench.e2e --tls``)
and the TLS tests (broker, receiver, sync; tests/helpers/pki.py) issue their certificates from it."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ThrowAwayCA"]

LOOPBACK = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:  # noqa: ANN001
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


class ThrowAwayCA:
    """``ca = ThrowAwayCA(dir); ca.path`` (its PEM); ``ca.issue("server", ...)`` -> (cert, key)."""

    __test__ = False  # not a pytest test class (the tests import it as TestCA)

    def __init__(self, directory: Path, name: str = "edgepipe throw-away CA") -> None:
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        self.cert = (
            _builder(subject, subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), False)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / f"{name.replace(' ', '-')}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.key, self.path.with_suffix(".key"))

    def issue(
        self,
        stem: str,
        *,
        cn: str = "localhost",
        client: bool = False,
    ) -> tuple[Path, Path]:
        """A server certificate for localhost/127.0.0.1 (or a client certificate)."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        b = (
            _builder(_name(cn), self.cert.subject, key.public_key())
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if not client:
            b = b.add_extension(x509.SubjectAlternativeName(LOOPBACK), critical=False)
        cert_path = self.dir / f"{stem}.crt"
        cert_path.write_bytes(
            b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        )
        return cert_path, _write_key(key, self.dir / f"{stem}.key")
