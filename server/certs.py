"""`medfed certs init`: the key material of one federation, made with `cryptography` alone.

* A private CA (`ca.crt`, `ca.key`) that the sites trust instead of the public web PKI.
* The SuperLink's TLS key and certificate (`server.key`, `server.crt`), signed by that CA, valid
  for the server's host name (or IP) and for localhost, so `medfed server start` can talk to its
  own SuperLink over TLS too.
* One folder per site with what that hospital receives: `ca.crt` and its SuperNode
  authentication key pair. Flower's `flower-supernode --auth-supernode-private-key` reads an
  OpenSSH-format EC private key; `flwr supernode register` reads the OpenSSH public key and
  accepts NIST curves only, hence ECDSA P-384 in OpenSSH format.
* `sites.yaml`: site name -> public key file; the SuperLink admits exactly these sites.

Private keys are created with mode 600 and never overwritten without `force`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.common.config_loading import read_yaml
from medfed.common.errors import MedfedError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
NODE_KEY, NODE_PUB = "node-auth.key", "node-auth.pub"
SITES_FILE = "sites.yaml"
CA_DAYS = 3650
SERVER_DAYS = 825
# A site name becomes a folder name and a Flower node name: keep it to safe characters.
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def init_certs(out: str | Path, *, server_host: str, sites: list[str], force: bool = False) -> dict:
    """Write the CA, the server certificate, per-site key pairs and sites.yaml into `out`.

    Returns {"ca": path, "server_cert": path, "server_key": path, "sites_file": path,
    "sites": {name: folder}}."""
    out = Path(out)
    host = server_host.strip()
    if not _is_ip(host) and not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", host):
        raise MedfedError(f"--server-host {server_host!r} is not a host name or IP address "
                          f"(no scheme, no port), e.g. fl.example.org")
    names = [s.strip() for s in sites if s.strip()]
    bad = [s for s in names if not SITE_NAME.match(s)]
    if bad:
        raise MedfedError(f"site name(s) {', '.join(map(repr, bad))} not allowed; use letters, "
                          f"digits, '.', '_' and '-' (e.g. hospital-a)")
    if not names:
        raise MedfedError("--sites names no site; give a comma-separated list, e.g. hospital-a,hospital-b")
    duplicates = sorted({s for s in names if names.count(s) > 1})
    if duplicates:
        raise MedfedError(f"site(s) named twice in --sites: {', '.join(duplicates)}")
    planned = [out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY, out / SITES_FILE,
               *(out / s for s in names)]
    existing = [str(p) for p in planned if p.exists()]
    if existing and not force:
        raise MedfedError(f"{out} already holds {', '.join(existing)}; refusing to overwrite keys "
                          f"(pass --force to replace them all, which locks out every site "
                          f"holding the old ones)")

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, host=host, ca_cert=ca_cert, ca_key=ca_key)

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / CA_CERT, ca_pem)
    _write(out / CA_KEY, _pem_private(ca_key), private=True)
    _write(out / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / SERVER_KEY, _pem_private(server_key), private=True)
    folders = {}
    for name in names:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP384R1())
        _write(folder / CA_CERT, ca_pem)
        _write(folder / NODE_KEY, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()), private=True)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        _write(folder / NODE_PUB, public + f" medfed-{name}\n".encode())
        folders[name] = folder
    sites_file = out / SITES_FILE
    _write(sites_file, (
        "# Sites allowed to join this federation: name -> OpenSSH public key file (relative to\n"
        "# this file). `medfed server start --sites` registers exactly these with the SuperLink.\n"
        + yaml.safe_dump({"sites": {n: f"{n}/{NODE_PUB}" for n in names}}, sort_keys=False)
    ).encode())
    return {"ca": out / CA_CERT, "server_cert": out / SERVER_CERT, "server_key": out / SERVER_KEY,
            "sites_file": sites_file, "sites": folders}


def read_sites(path: str | Path) -> dict[str, Path]:
    """sites.yaml -> {site name: absolute public key path}; every key file must exist and load."""
    path = Path(path)
    if not path.is_file():
        raise MedfedError(f"sites file {path} does not exist; `medfed certs init` writes one")
    raw = read_yaml(path, what="sites file") or {}
    sites = raw.get("sites") if isinstance(raw, dict) else None
    if not isinstance(sites, dict) or not sites:
        raise MedfedError(f"sites file {path} has no 'sites:' mapping of site name -> public key file")
    resolved = {}
    for name, key_file in sites.items():
        name = str(name)
        if not SITE_NAME.match(name):
            raise MedfedError(f"sites file {path}: site name {name!r} not allowed; use letters, "
                              f"digits, '.', '_' and '-'")
        key_path = (path.parent / str(key_file)).resolve()
        load_public_key(key_path, site=name)
        resolved[name] = key_path
    return resolved


def load_public_key(path: Path, *, site: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except OSError as exc:
        raise MedfedError(f"public key of site {site} ({path}) cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise MedfedError(f"public key of site {site} ({path}) is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise MedfedError(f"public key of site {site} ({path}) is not an EC key; Flower's node "
                          f"authentication needs an ECDSA (NIST curve) key")
    return key


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "medfed federation CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Backdated a little: a site whose clock runs slow must not reject a fresh certificate.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(key: ec.EllipticCurvePrivateKey, *, host: str, ca_cert: x509.Certificate,
                        ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    names: list[x509.GeneralName] = []
    if _is_ip(host):
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    else:
        names.append(x509.DNSName(host))
    if host != "localhost":
        names.append(x509.DNSName("localhost"))
    if host != "127.0.0.1":
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    # A private key is created with mode 600 from the start, never readable by others in between.
    mode = 0o600 if private else 0o644
    try:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(path, mode)  # the umask may have removed bits from a public file's mode
    except OSError as exc:
        raise MedfedError(f"cannot write {path}: {exc.strerror or exc}") from None
