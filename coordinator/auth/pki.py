"""The fleet's CA and the broker's server certificate (X.509, with the ``cryptography`` package).

The CA is self-signed and lives only in the auth directory (its key 0600); clients trust it
alone (``--tls-ca``). The server certificate names every ``--server-name`` given plus
``localhost`` and ``127.0.0.1`` (DNS or IP SANs as each looks), so clients check the host name
they dial, and serves brokers as their identity towards each other on cluster routes. Keys are
ECDSA P-256: small, fast handshakes, accepted by nats-server and Python's ssl.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest server certificate lifetime clients commonly accept


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(fleet: str, now: dt.datetime) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fleetwave {fleet} CA")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def server_names(given: tuple[str, ...]) -> list[str]:
    """The names the server certificate holds: those given, then localhost and 127.0.0.1;
    ValueError (one line) for a name no certificate can hold: not an IP address nor a DNS name
    of ASCII labels (letters, digits, '-', '*' first), each at most 63 characters, at most 253
    in all (a Unicode name must be given as its A-label, xn--...)."""
    names: list[str] = []
    for n in (*given, "localhost", "127.0.0.1"):
        if n not in names:
            _check_server_name(n)
            names.append(n)
    return names


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def _check_server_name(name: str) -> None:
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return
    labels = name.rstrip(".").split(".")
    if labels and labels[0] == "*":  # a wildcard certificate's first label
        labels = labels[1:]
    if (not name or len(name) > 253 or not labels
            or not all(_LABEL.match(label) for label in labels)):
        raise ValueError(f"--server-name {name[:80]!r} is not a host name a certificate can "
                         "hold: ASCII letters, digits and '-' in dot-separated labels of at most "
                         "63 characters (a Unicode name as its xn-- form), or an IP address")


def make_server(ca: Pem, names: list[str], now: dt.datetime) -> Pem:
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)  # we made it so in make_ca
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        # A fixed CN: clients check the SANs, and a name of 64+ characters cannot be a CN.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetwave broker")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        # Never past the CA's own expiry: clients would refuse it from then on anyway.
        .not_valid_after(min(now + dt.timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # clientAuth too: brokers of a cluster show this certificate to each other on their
        # routes (mutual TLS), where the dialing broker is the TLS client.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def expires(cert_pem: bytes) -> dt.datetime:
    """When a certificate stops being valid (UTC); ValueError if ``cert_pem`` is not one."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def serves_routes(cert_pem: bytes) -> bool:
    """Whether a server certificate may also authenticate its broker on cluster routes (it
    names clientAuth; those made before routes were secured do not)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no restriction at all
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage
