"""TLS, mutual TLS and bearer tokens, over real gRPC on loopback with certificates made here."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from resnet_serve.client.sync import ChannelOptions, ClassifierClient, ClassifierError
from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.protos import classifier_pb2_grpc as pb_grpc
from tests.harness import InProcessServer

TOKEN = "s3cret-token-for-tests"


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, ca: bool, san: list[str] | None = None):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        import ipaddress

        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in san]),
            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert, key) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return path.with_suffix(".crt"), path.with_suffix(".key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "resnet-serve test CA")])
    ca = _cert("resnet-serve test CA", ca_key, ca_name, ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    out = {}
    out["ca"], _ = _write(d / "ca", ca, ca_key)
    out["server_crt"], out["server_key"] = _write(
        d / "server", _cert("localhost", server_key, ca_name, ca_key, False, ["localhost", "127.0.0.1"]), server_key)
    out["client_crt"], out["client_key"] = _write(d / "client", _cert("client", client_key, ca_name, ca_key, False),
                                                  client_key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else")])
    out["other_ca"], _ = _write(d / "other", _cert("someone else", other_key, other_name, other_key, True), other_key)
    (d / "tokens").write_text(f"# one token per line\n{TOKEN}\nanother-token\n")
    out["tokens"] = d / "tokens"
    return out


def _image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def mtls_server(tiny_model_dir: Path, pki):
    s = InProcessServer(model_dir=str(tiny_model_dir), threads_per_instance=1, tls_cert=str(pki["server_crt"]),
                        tls_key=str(pki["server_key"]), tls_client_ca=str(pki["ca"]),
                        auth_token_file=str(pki["tokens"]), wait_ready=False)
    s.wait_ready()
    yield s
    s.close()


def _client(s: InProcessServer, pki, ca="ca", cert=True, token: str | None = TOKEN) -> ClassifierClient:
    opts = ChannelOptions(root_certificates=pki[ca], client_certificate=pki["client_crt"] if cert else None,
                          client_key=pki["client_key"] if cert else None,
                          metadata=(("authorization", f"Bearer {token}"),) if token is not None else (),
                          extra=(("grpc.ssl_target_name_override", "localhost"),))
    return ClassifierClient(f"localhost:{s.server.port}", opts, timeout=10)


def test_client_with_ca_cert_and_token_succeeds(mtls_server, pki) -> None:
    with _client(mtls_server, pki) as c:
        assert len(c.classify(_image()).predictions) == 5


def test_client_without_the_ca_fails(mtls_server, pki) -> None:
    with _client(mtls_server, pki, ca="other_ca") as c, pytest.raises(ClassifierError) as err:
        c.classify(_image())
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_fails(mtls_server) -> None:
    with ClassifierClient(f"127.0.0.1:{mtls_server.server.port}", timeout=10) as c, \
            pytest.raises(ClassifierError) as err:
        c.classify(_image())
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_rejects_a_client_without_certificate(mtls_server, pki) -> None:
    with _client(mtls_server, pki, cert=False) as c, pytest.raises(ClassifierError) as err:
        c.classify(_image())
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("token", [None, "wrong-token", ""], ids=["missing", "wrong", "empty"])
def test_token_interceptor_rejects(mtls_server, pki, token) -> None:
    with _client(mtls_server, pki, token=token) as c:
        with pytest.raises(ClassifierError) as err:
            c.classify(_image())
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(ClassifierError) as err:
            c.model_info()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        # Health is exempt (probes carry no secret) by default.
        assert c.health() == "SERVING"


def test_second_token_in_file_works(mtls_server, pki) -> None:
    with _client(mtls_server, pki, token="another-token") as c:
        assert c.model_info().name == "tiny"


def test_token_never_in_the_logged_configuration(mtls_server) -> None:
    assert TOKEN not in mtls_server.settings.describe()


def test_admin_reload_needs_token(mtls_server, pki) -> None:
    with _client(mtls_server, pki, token=None) as c:
        stub = pb_grpc.AdminStub(c.channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ReloadModel(pb.ReloadModelRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with _client(mtls_server, pki) as c:
        r = pb_grpc.AdminStub(c.channel).ReloadModel(pb.ReloadModelRequest(), timeout=60,
                                                     metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert not r.changed and r.version == "1"


def test_admin_disabled_without_tokens(tiny_model_dir: Path) -> None:
    s = InProcessServer(model_dir=str(tiny_model_dir), threads_per_instance=1)
    try:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.AdminStub(s.channel).ReloadModel(pb.ReloadModelRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        s.close()


def test_health_can_require_token(tiny_model_dir: Path, pki, caplog) -> None:
    s = InProcessServer(model_dir=str(tiny_model_dir), threads_per_instance=1, auth_token_file=str(pki["tokens"]),
                        auth_exempt_health=False)
    try:
        stub = health_pb2_grpc.HealthStub(s.channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Check(health_pb2.HealthCheckRequest(), timeout=10,
                        metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        # The health port answers without a token (probes cannot send one), so it stays closed here.
        assert s.server.health_port == 0 and "health port off" in caplog.text  # asked for 0: opened, it is > 0
    finally:
        s.close()


@pytest.mark.parametrize("source", ["comment-only file", "blank file", "missing file", "empty env"])
def test_a_token_source_that_yields_no_token_refuses_to_start(tiny_model_dir: Path, tmp_path: Path,
                                                             source: str) -> None:
    """Configured auth that yields no token must not serve every method unauthenticated: one line, exit 2."""
    from tests.harness import run_cli

    tokens = tmp_path / "tokens"
    env = {}
    if source == "comment-only file":
        tokens.write_text("# the production token goes here\n")
    elif source == "blank file":
        tokens.write_text("\n  \n")
    elif source == "empty env":
        env["RESNET_SERVE_AUTH_TOKENS"] = " , "
    args = ["resnet-serve", "--model-dir", str(tiny_model_dir), "--port", "0", "--metrics-port", "-1"]
    if source != "empty env":
        args += ["--auth-token-file", str(tokens)]
    r = run_cli(*args, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and ("no token" in r.stderr or "No such file" in r.stderr), r.stderr
