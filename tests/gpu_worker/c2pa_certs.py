"""A throwaway certificate authority and a C2PA signing certificate it issued, for the tests.

C2PA wants the signing certificate to allow digital signatures for a purpose it accepts (here
e-mail protection), and refuses one without those extensions. Nobody trusts this CA, so
readers report ``signingCredential.untrusted``: that, and only that, is expected.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class SigningFiles:
    cert: Path  # the leaf, then the CA, in PEM
    key: Path  # the leaf's PKCS#8 PEM key, mode 0600


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "diffusion-cluster tests")])


def _usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                         decipher_only=False)


def make_signing_files(folder: Path, *, usable: bool = True) -> SigningFiles:
    """Write a certificate chain and key: one C2PA takes, or (not ``usable``) a self-signed
    certificate without the extensions it wants."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("test CA")).issuer_name(_name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(_usage(sign=False, ca=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(_name("test signer"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)))
    if not usable:
        leaf = leaf.issuer_name(_name("test signer"))
        return _write(folder, leaf.sign(key, hashes.SHA256()), None, key)
    leaf = (leaf.issuer_name(ca.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(sign=True, ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False))
    return _write(folder, leaf.sign(ca_key, hashes.SHA256()), ca, key)


def _write(folder: Path, leaf: x509.Certificate, ca: x509.Certificate | None,
           key: ec.EllipticCurvePrivateKey) -> SigningFiles:
    chain = leaf.public_bytes(serialization.Encoding.PEM)
    if ca is not None:
        chain += ca.public_bytes(serialization.Encoding.PEM)
    files = SigningFiles(folder / "c2pa-chain.pem", folder / "c2pa-key.pem")
    files.cert.write_bytes(chain)
    files.key.touch(mode=0o600)
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    os.chmod(files.key, 0o600)
    return files
