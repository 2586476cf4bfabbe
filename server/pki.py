"""Keys and certificates for a deployment: a private CA, the SuperLink's TLS certificate, campus key pairs.

For demos and tests only (``edufl certs``); production users bring certificates
from their own CA. :func:`make_pki` writes one folder that both sides read
(each side needs only part of it; :mod:`edufl.federation.deploy` names its files):

=====================  ==========================================================
``ca.crt``             CA certificate: campuses and ``flwr`` verify the SuperLink with it
``ca.key``             CA private key (keep it off every machine once certificates are issued)
``superlink.crt/.key`` the SuperLink's TLS certificate (subject alternative names:
                       ``localhost``, ``127.0.0.1``, ``::1`` and every ``hosts`` entry) and key
``campus-NAME.key``    campus NAME's SuperNode authentication private key (OpenSSH format)
``campus-NAME.pub``    its public key (OpenSSH format), registered on the SuperLink
=====================  ==========================================================

Private keys are created readable by their owner only (mode 0600) from the first
byte on; :func:`superexec_secret` makes the coordinator's SuperExec secret the same way.

Flower's SuperNode authentication takes an elliptic-curve key on a NIST curve
(P-384 here) in OpenSSH format (``flwr supernode register`` and
``flower-supernode --auth-supernode-private-key``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edufl.federation.deploy import CA_CERT, SUPERLINK_CERT, SUPERLINK_KEY, PKIError, campus_key, check_campus_name

__all__ = ["CA_KEY", "LOCAL_NAMES", "SUPEREXEC_SECRET", "make_pki", "registered_campuses", "superexec_secret"]

CA_KEY = "ca.key"
SUPEREXEC_SECRET = "superexec-auth.secret"  # in the coordinator's state folder
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
_CURVE = ec.SECP384R1
_VALID_DAYS = 825  # the longest server-certificate lifetime common clients accept


def _public_key(pki: Path, campus: str) -> Path:
    """Path of ``campus``'s authentication public key in the folder ``pki``."""
    return Path(pki) / f"campus-{campus}.pub"


def registered_campuses(pki: Path) -> dict[str, Path]:
    """Campus name -> public key file, for every ``campus-NAME.pub`` in ``pki`` (sorted by name)."""
    return {p.name[len("campus-") : -len(".pub")]: p for p in sorted(Path(pki).glob("campus-*.pub"))}


def _write(path: Path, data: bytes, private: bool) -> None:
    """Create ``path`` (never overwriting a file) holding ``data``: mode 0600 if ``private``, else 0644
    (less what the umask removes), set when the file is created, before anything is written to it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def superexec_secret(folder: Path) -> Path:
    """The coordinator's SuperExec secret, ``folder/superexec-auth.secret`` (32 random bytes), created with
    mode 0600 if it is not there yet: the SuperLink gives a run's ServerApp task only to a SuperExec holding it.

    Raises
    ------
    PKIError
        When the file exists but is empty, or can be read by other users than its owner.
    """
    path = Path(folder) / SUPEREXEC_SECRET
    Path(folder).mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        _write(path, secrets.token_bytes(32), private=True)
    if path.stat().st_size == 0 or path.stat().st_mode & 0o077:
        raise PKIError(f"{path}: expected a non-empty file only its owner can read (chmod 600), or delete it to get a new one")
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
            raise PKIError(f"--host {name!r}: expected a DNS name or an IP address") from None
        return x509.DNSName(name)


def _certificate(subject: str, public_key, issuer: x509.Name | None, signer, *, ca: bool, sans=()) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(signer, hashes.SHA384())


def make_pki(out: Path, campuses: list[str], hosts: list[str] = ()) -> list[Path]:
    """Write a private CA, a SuperLink certificate and one key pair per campus into the folder ``out``.

    The SuperLink certificate is valid for ``localhost``, ``127.0.0.1``, ``::1``
    and every name or IP address in ``hosts`` (the names campuses dial).
    Existing files are never overwritten: a new campus can be added to an
    existing folder (its CA and SuperLink certificate are kept).

    Returns the files written.

    Raises
    ------
    PKIError
        On an invalid campus or host name, or when ``out`` holds a SuperLink
        certificate but not the CA key that signed it.
    """
    out = Path(out)
    for campus in campuses:
        check_campus_name(campus)
    sans = [_san(h) for h in dict.fromkeys([*LOCAL_NAMES, *hosts])]
    out.mkdir(parents=True, exist_ok=True)
    ca_cert_file, cert_file, key_file = out / CA_CERT.name, out / SUPERLINK_CERT.name, out / SUPERLINK_KEY.name
    written = []
    if not ca_cert_file.exists():
        ca_key = ec.generate_private_key(_CURVE())
        ca_cert = _certificate("edufl demo CA", ca_key.public_key(), None, ca_key, ca=True)
        _write(out / CA_KEY, _key_pem(ca_key), private=True)
        _write(ca_cert_file, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        written += [out / CA_KEY, ca_cert_file]
    if not cert_file.exists():
        if not (out / CA_KEY).exists():
            raise PKIError(f"{out / CA_KEY} is missing: cannot sign a SuperLink certificate with the CA in {out}")
        ca_key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_file.read_bytes())
        key = ec.generate_private_key(_CURVE())
        cert = _certificate("edufl superlink", key.public_key(), ca_cert.subject, ca_key, ca=False, sans=sans)
        _write(key_file, _key_pem(key), private=True)
        _write(cert_file, cert.public_bytes(serialization.Encoding.PEM), private=False)
        written += [key_file, cert_file]
    for campus in campuses:
        private, public = out / campus_key(campus).name, _public_key(out, campus)
        if private.exists():
            continue
        key = ec.generate_private_key(_CURVE())
        _write(
            private,
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
            private=True,
        )
        ssh_public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(public, ssh_public + f" edufl-campus-{campus}\n".encode(), private=False)
        written += [private, public]
    return written
