"""`medfed certs init`: a CA, a server certificate the sites can verify, and per-site keys in the
formats Flower's SuperNode authentication reads."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
import yaml
from commands import medfed
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from flwr.cli.supernode.register import try_load_public_key

from medfed.client import supernode
from medfed.common.errors import MedfedError
from medfed.server import certs

SITES = ["hospital-a", "hospital-b", "hospital-c"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "certs"
    certs.init_certs(out, server_host="fl.example.org", sites=SITES)
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def test_server_certificate_names_the_host_and_localhost(made):
    dns, ips = _sans(_cert(made / "server.crt"))
    assert dns == ["fl.example.org", "localhost"]
    assert ips == ["127.0.0.1"]


def test_an_ip_host_becomes_an_ip_san(tmp_path):
    certs.init_certs(tmp_path, server_host="10.1.2.3", sites=["a"])
    dns, ips = _sans(_cert(tmp_path / "server.crt"))
    assert dns == ["localhost"] and ips == ["10.1.2.3", "127.0.0.1"]


@pytest.mark.parametrize("name", ["fl.example.org", "localhost"])
def test_server_chain_verifies_against_the_ca(made, name):
    store = Store([_cert(made / "ca.crt")])
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))
    chain = verifier.verify(_cert(made / "server.crt"), [])
    assert chain[-1] == _cert(made / "ca.crt")
    ip_verifier = PolicyBuilder().store(store).build_server_verifier(
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    ip_verifier.verify(_cert(made / "server.crt"), [])


def test_server_key_matches_its_certificate(made):
    key = serialization.load_pem_private_key((made / "server.key").read_bytes(), password=None)
    assert key.public_key() == _cert(made / "server.crt").public_key()


def test_site_keys_load_as_flower_reads_them(made):
    for site in SITES:
        folder = made / site
        # flower-supernode --auth-supernode-private-key reads an OpenSSH EC private key ...
        private = serialization.load_ssh_private_key((folder / "node-auth.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        # ... and `flwr supernode register` its OpenSSH public key (NIST curves only).
        registered = try_load_public_key(folder / "node-auth.pub")
        expected = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
        assert registered == expected
        assert (folder / "ca.crt").read_bytes() == (made / "ca.crt").read_bytes()


def test_sites_yaml_lists_every_site(made):
    listed = yaml.safe_load((made / "sites.yaml").read_text())["sites"]
    assert list(listed) == SITES
    assert certs.read_sites(made / "sites.yaml") == {
        s: (made / s / "node-auth.pub").resolve() for s in SITES}


def test_private_keys_are_owner_only(made):
    private = [made / "ca.key", made / "server.key", *(made / s / "node-auth.key" for s in SITES)]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((made / "ca.crt").stat().st_mode) == 0o644


def test_client_reads_the_site_folder_as_certs_writes_it():
    assert (supernode.CA_CERT, supernode.NODE_KEY) == (certs.CA_CERT, certs.NODE_KEY)


def test_refuses_to_overwrite_without_force(tmp_path):
    certs.init_certs(tmp_path, server_host="fl.example.org", sites=["a"])
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(MedfedError, match="refusing to overwrite"):
        certs.init_certs(tmp_path, server_host="fl.example.org", sites=["b"])
    assert (tmp_path / "ca.key").read_bytes() == before
    certs.init_certs(tmp_path, server_host="fl.example.org", sites=["a"], force=True)
    assert (tmp_path / "ca.key").read_bytes() != before


@pytest.mark.parametrize("host, sites, message", [
    ("https://fl.example.org", ["a"], "not a host name"),
    ("fl.example.org:9092", ["a"], "not a host name"),
    ("fl.example.org", ["a b"], "not allowed"),
    ("fl.example.org", ["../x"], "not allowed"),
    ("fl.example.org", ["a", "a"], "named twice"),
    ("fl.example.org", [""], "names no site"),
])
def test_bad_input_is_refused_by_name(tmp_path, host, sites, message):
    with pytest.raises(MedfedError, match=message):
        certs.init_certs(tmp_path, server_host=host, sites=sites)
    assert not any(tmp_path.iterdir())


def test_sites_file_with_a_missing_key_is_refused(made, tmp_path):
    sites_file = tmp_path / "sites.yaml"
    sites_file.write_text("sites:\n  hospital-x: nowhere.pub\n")
    with pytest.raises(MedfedError, match="hospital-x"):
        certs.read_sites(sites_file)


def test_cli_refuses_overwrite_with_one_line(tmp_path):
    first = medfed("certs", "init", "--out", str(tmp_path), "--server-host", "fl.example.org",
                   "--sites", "hospital-a,hospital-b")
    assert first.returncode == 0, first.stderr
    assert "hospital-b" in first.stdout
    again = medfed("certs", "init", "--out", str(tmp_path), "--server-host", "fl.example.org",
                   "--sites", "hospital-a")
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and "--force" in again.stderr
    assert "Traceback" not in again.stderr
