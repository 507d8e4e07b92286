"""Throw-away TLS material for tests and benchmarks: a self-signed CA and certificates it
signs, written as PEM files, made with the ``cryptography`` package when it is installed and
with the ``openssl`` command otherwise (neither is a dagc dependency).

    ca = make_ca(tmp_path, "ca")                  # -> Cert(cert, key)
    leaf = make_cert(tmp_path, "node", ca)        # signed by ca; serverAuth + clientAuth
    files = (leaf.cert, leaf.key, ca.cert)        # what RAY_TLS_SERVER_CERT/KEY/CA_CERT name

``available()`` says whether either tool is there (tests skip with its reason otherwise).
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from typing import NamedTuple


class Cert(NamedTuple):
    cert: str
    key: str


def available() -> str | None:
    """None when certificates can be made here, else why not."""
    try:
        import cryptography  # noqa: F401  (only whether it imports)

        return None
    except ImportError:
        pass
    if shutil.which("openssl"):
        return None
    return "neither the cryptography package nor the openssl command is installed"


def _use_cryptography() -> bool:
    try:
        import cryptography  # noqa: F401  (only whether it imports)

        return True
    except ImportError:
        return False


def make_ca(dirpath, name: str = "ca") -> Cert:
    dirpath = str(dirpath)
    cert, key = os.path.join(dirpath, f"{name}.crt"), os.path.join(dirpath, f"{name}.key")
    if _use_cryptography():
        _crypto_cert(cert, key, f"dagc test {name}", None)
    else:
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN=dagc test {name}",
            "-keyout",
            key,
            "-out",
            cert,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
    return Cert(cert, key)


def make_cert(dirpath, name: str, ca: Cert, ips=("127.0.0.1",)) -> Cert:
    """A certificate ``ca`` signs, for ``ips`` and localhost (a Ray node with TLS needs its
    own address there: Ray's gRPC checks it; dagc's channels do not)."""
    dirpath = str(dirpath)
    ips = tuple(dict.fromkeys(ips))
    cert, key = os.path.join(dirpath, f"{name}.crt"), os.path.join(dirpath, f"{name}.key")
    if _use_cryptography():
        _crypto_cert(cert, key, f"dagc test {name}", ca, ips)
    else:
        csr = os.path.join(dirpath, f"{name}.csr")
        ext = os.path.join(dirpath, f"{name}.ext")
        with open(ext, "w") as f:
            f.write(
                "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
                "subjectAltName=" + ",".join([f"IP:{ip}" for ip in ips] + ["DNS:localhost"]) + "\n"
            )
        _openssl(
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            f"/CN=dagc test {name}",
            "-keyout",
            key,
            "-out",
            csr,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca.cert,
            "-CAkey",
            ca.key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            cert,
        )
    return Cert(cert, key)


def _openssl(*args) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _crypto_cert(
    cert_path: str, key_path: str, cn: str, ca: Cert | None, ips=("127.0.0.1",)
) -> None:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
    )
    if ca is None:
        b = (
            b.issuer_name(subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        )
        signer = key
    else:
        with open(ca.cert, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        with open(ca.key, "rb") as f:
            signer = serialization.load_pem_private_key(f.read(), password=None)
        b = (
            b.issuer_name(ca_cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
                    + [x509.DNSName("localhost")]
                ),
                critical=False,
            )
        )
    cert = b.sign(signer, hashes.SHA256())
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(key_path, 0o600)
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
