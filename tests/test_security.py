"""TLS and mutual TLS on the gRPC port, with certificates made in the test; names cannot leave the repository."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.utils import InferenceServerException

from tests.server import start


def _cert(name: str, issuer: tuple | None = None, ca: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                                     x509.IPAddress(__import__("ipaddress")
                                                                                    .ip_address("127.0.0.1"))]),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(path: Path, cert, key=None) -> tuple[Path, Path | None]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return path.with_suffix(".crt"), None
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    return path.with_suffix(".crt"), path.with_suffix(".key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = _cert("trtserve test CA", ca=True)
    server = _cert("localhost", issuer=ca)
    client = _cert("client", issuer=ca)
    other_ca = _cert("someone else", ca=True)
    stranger = _cert("stranger", issuer=other_ca)
    return {"ca": _write(d / "ca", ca[0])[0], "server": _write(d / "server", *server),
            "client": _write(d / "client", *client), "stranger": _write(d / "stranger", *stranger)}


def _infer(url: str, **tls) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url, ssl=bool(tls), **tls)
    x = np.ones((1, 16), np.float32)
    inp = grpcclient.InferInput("x", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    try:
        return client.infer("tiny", [inp], client_timeout=10).as_numpy("y")
    finally:
        client.close()


def test_tls_and_mutual_tls(example_repo, pki):
    cert, key = pki["server"]
    ca = str(pki["ca"])
    with start(example_repo, ["--model-control-mode", "explicit", "--load-model", "tiny",
                              "--tls-cert", str(cert), "--tls-key", str(key)]) as server:
        assert _infer(server.url, root_certificates=ca).shape == (1, 16)
        with pytest.raises(InferenceServerException):  # plaintext client against a TLS port
            _infer(server.url)

    with start(example_repo, ["--model-control-mode", "explicit", "--load-model", "tiny",
                              "--tls-cert", str(cert), "--tls-key", str(key),
                              "--tls-client-ca", ca]) as server:
        c_cert, c_key = pki["client"]
        assert _infer(server.url, root_certificates=ca, private_key=str(c_key),
                      certificate_chain=str(c_cert)).shape == (1, 16)
        with pytest.raises(InferenceServerException):  # no client certificate
            _infer(server.url, root_certificates=ca)
        s_cert, s_key = pki["stranger"]
        with pytest.raises(InferenceServerException):  # certificate from another CA
            _infer(server.url, root_certificates=ca, private_key=str(s_key), certificate_chain=str(s_cert))


def test_tls_flags_must_come_together(example_repo, pki):
    import subprocess
    import sys

    cert, _ = pki["server"]
    out = subprocess.run([sys.executable, "-m", "service", "serve", "--model-repository", str(example_repo),
                          "--tls-cert", str(cert)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--tls-key" in out.stderr


def test_model_names_cannot_leave_the_repository(example_repo):
    with start(example_repo, ["--model-control-mode", "explicit", "--load-model", "tiny"]) as server:
        client = grpcclient.InferenceServerClient(server.url)
        for name in ["../tiny", "tiny/../mlp", "/etc", "..", ".hidden", "tiny\x00", "../../../../etc/passwd"]:
            with pytest.raises(InferenceServerException) as err:
                client.load_model(name)
            assert err.value.status() == "StatusCode.NOT_FOUND", name
        ready = [m["name"] for m in client.get_model_repository_index(as_json=True)["models"]
                 if m.get("state") == "READY"]
        assert ready == ["tiny"]
