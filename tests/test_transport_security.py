"""Transport security and where the ports bind: TLS on the gRPC port with certificates made here
(a private CA and a server certificate for 127.0.0.1 / localhost), the plaintext health-only port
that Kubernetes' probes use beside it, the client commands over TLS, and /metrics bound to the
host it is told. A real grpc.aio server on loopback over the shipped models in process."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from lodestar.orchestrator.driver import Orchestrator
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.orchestrator.state_store import open_state_store
from lodestar.services.app import ServeConfig
from lodestar.services.cli import app
from lodestar.services.client import ClientTLS, open_channel
from lodestar.services.local_redis import free_port
from lodestar.services.metrics import Metrics
from lodestar.services.server import LIVENESS, LodestarServer, ServerConfig
from lodestar.v1 import search_pb2 as pb
from lodestar.v1 import search_pb2_grpc as pb_grpc
from tests.runtime_parts import shipped_workers

LODESTAR = [sys.executable, "-m", "lodestar.services.cli"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path) -> TlsFiles:
    """A CA, and a server certificate it signed for localhost and 127.0.0.1 (PEM files)."""
    now = datetime.datetime.now(datetime.UTC)
    valid = {
        "not_valid_before": now - datetime.timedelta(minutes=5),
        "not_valid_after": now + datetime.timedelta(days=1),
    }
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Lodestar test CA")])
    usage = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    ca = (
        x509.CertificateBuilder(**valid)
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(**usage, key_cert_sign=True, crl_sign=True),  # type: ignore[arg-type]
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder(**valid)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(folder / "ca.pem", folder / "tls.crt", folder / "tls.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return shipped_workers()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@contextlib.asynccontextmanager
async def tls_server(models: tuple[Any, Any], certs: TlsFiles, **config: Any) -> AsyncIterator[Any]:
    """A SERVING server with TLS on 127.0.0.1:0."""
    store = open_state_store("memory://")
    orchestrator = Orchestrator(store, LocalWorkers(*models))
    await orchestrator.start()
    server = LodestarServer(
        orchestrator,
        ServerConfig(address="127.0.0.1:0", tls_cert=certs.cert, tls_key=certs.key, **config),
    )
    await server.start()
    await server.set_serving()
    try:
        yield server
    finally:
        await server.stop()
        await orchestrator.close()
        await store.close()


async def health_of(address: str, tls: ClientTLS, service: str = "") -> Any:
    """The health status, or the status code of the failed call."""
    async with open_channel(address, tls) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=10
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
        return reply.status


def pf_request(problem: str = "(7+5)*3") -> pb.SearchRequest:
    return pb.SearchRequest(
        problem=pb.Problem(text=problem), params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=4))
    )


def test_a_tls_port_serves_clients_that_trust_its_ca_and_refuses_plaintext(models, certs):
    async def main() -> dict[str, Any]:
        async with tls_server(models, certs) as server:
            address = f"127.0.0.1:{server.port}"
            trusted = ClientTLS(ca=certs.ca)
            async with open_channel(address, trusted) as channel:
                result = await pb_grpc.SearchServiceStub(channel).Search(pf_request(), timeout=60)
            return {
                "health": await health_of(address, trusted),
                "result": result,
                "plaintext": await health_of(address, ClientTLS()),
                # gRPC's default roots (the system bundle here) do not know the private CA
                "default roots": await health_of(address, ClientTLS(enabled=True)),
            }

    seen = asyncio.run(main())
    assert seen["health"] == SERVING
    assert seen["result"].final_answer == "36" and seen["result"].spend.generated_tokens > 0
    assert seen["plaintext"] == grpc.StatusCode.UNAVAILABLE
    assert seen["default roots"] == grpc.StatusCode.UNAVAILABLE


def test_the_health_port_answers_probes_in_plaintext_and_serves_nothing_else(models, certs):
    """Kubernetes' gRPC probes speak no TLS: beside the TLS port, a plaintext port serves the
    same health statuses (readiness follows `set_serving`) and no SearchService."""

    async def main() -> dict[str, Any]:
        async with tls_server(models, certs, health_address="127.0.0.1:0") as server:
            probe = f"127.0.0.1:{server.health_port}"
            seen = {
                "ready": await health_of(probe, ClientTLS()),
                "live": await health_of(probe, ClientTLS(), LIVENESS),
            }
            await server.set_serving(False)
            seen["not ready"] = await health_of(probe, ClientTLS())
            async with open_channel(probe) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.SearchServiceStub(channel).GetSearch(
                        pb.GetSearchRequest(search_id="x"), timeout=10
                    )
            seen["search"] = info.value.code()
            seen["main port, plaintext"] = await health_of(f"127.0.0.1:{server.port}", ClientTLS())
            return seen

    assert asyncio.run(main()) == {
        "ready": SERVING,
        "live": SERVING,
        "not ready": NOT_SERVING,
        "search": grpc.StatusCode.UNIMPLEMENTED,
        "main port, plaintext": grpc.StatusCode.UNAVAILABLE,
    }


@pytest.mark.integration
def test_the_client_commands_talk_tls_with_a_ca_file_or_the_default_roots(
    models, certs, tmp_path: Path
):
    """`lodestar search`, `batch submit` and `batch status` as separate processes: `--ca FILE`,
    and `--tls` with the default roots pointed at the CA (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH)."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text('"(1+2)*3"\n"4*5-6"\n')
    output = tmp_path / "results.jsonl"
    roots_env = dict(os.environ, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(certs.ca))

    async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *LODESTAR,
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    async def main() -> dict[str, tuple[int, str]]:
        async with tls_server(models, certs) as server:
            address = ("--address", f"127.0.0.1:{server.port}")
            search = ("search", "(7+5)*3", *address, "-n", "4")
            return {
                "search --ca": await run(*search, "--ca", str(certs.ca)),
                "search": await run(*search),
                "search --tls": await run(*search, "--tls", env=roots_env),
                "submit --ca": await run(
                    *("batch", "submit", str(problems), "-o", str(output), "-a", "greedy"),
                    *(*address, "--ca", str(certs.ca)),
                ),
                "status --tls": await run(
                    "batch", "status", "nope", *address, "--tls", env=roots_env
                ),
            }

    seen = asyncio.run(main())
    code, out = seen["search --ca"]
    assert code == 0 and "final answer  36" in out, out
    code, out = seen["search"]
    assert code == 1 and "UNAVAILABLE" in out, out
    code, out = seen["search --tls"]
    assert code == 0 and "final answer  36" in out, out
    code, out = seen["submit --ca"]
    assert code == 0, out
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["line"] for r in results) == [1, 2]
    assert all(r["status"] == "succeeded" for r in results)
    code, out = seen["status --tls"]  # the call got through TLS to the service, which answered
    assert code == 1 and "NOT_FOUND" in out, out


def test_tls_needs_both_the_certificate_and_its_key(certs) -> None:
    with pytest.raises(ValueError, match="both"):
        ServerConfig(tls_cert=certs.cert)
    runner = CliRunner()
    half = runner.invoke(app, ["serve", "--tls-cert", str(certs.cert)])
    assert half.exit_code == 2 and "give both or neither" in half.output, half.output
    missing = runner.invoke(app, ["serve", "--tls-cert", "/nope.crt", "--tls-key", str(certs.key)])
    assert missing.exit_code == 2 and "no such file" in missing.output, missing.output


def test_serve_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch, certs) -> None:
    """What `lodestar serve` hands the app: TLS files, the health port on --host, and /metrics
    on --host unless --metrics-host says otherwise (nothing is started)."""
    import lodestar.services.app
    import lodestar.services.logs

    configs: list[ServeConfig] = []

    async def record(config: ServeConfig, announce: Any = None) -> None:
        configs.append(config)

    monkeypatch.setattr(lodestar.services.app, "serve", record)
    monkeypatch.setattr(lodestar.services.logs, "configure_logging", lambda *a, **k: None)
    common = ["serve", "--host", "127.0.0.1", "--port", "5000", "--metrics-port", "9090"]
    tls = ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--health-port", "5001"]
    for args in (common + tls, [*common, "--metrics-host", "0.0.0.0"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    on_tls, wide_metrics = configs
    assert on_tls.server.tls_cert == certs.cert and on_tls.server.tls_key == certs.key
    assert on_tls.server.health_address == "127.0.0.1:5001"
    assert on_tls.metrics_address == ("127.0.0.1", 9090)
    assert wide_metrics.server.tls_cert is None and wide_metrics.server.health_address is None
    assert wide_metrics.metrics_address == ("0.0.0.0", 9090)


def test_metrics_host_defaults_to_the_grpc_host() -> None:
    def at(address: str, **kw: Any) -> tuple[str, int] | None:
        return ServeConfig(server=ServerConfig(address=address), **kw).metrics_address

    assert at("127.0.0.1:50051", metrics_port=9090) == ("127.0.0.1", 9090)
    assert at("0.0.0.0:50051", metrics_port=9090) == ("0.0.0.0", 9090)
    assert at("[::1]:50051", metrics_port=9090) == ("::1", 9090)
    assert at("127.0.0.1:50051", metrics_port=9090, metrics_host="10.0.0.5") == ("10.0.0.5", 9090)
    assert at("127.0.0.1:50051") is None  # off


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False


def test_metrics_bind_only_the_host_they_are_told() -> None:
    """Bound to 127.0.0.1, /metrics answers there and refuses 127.0.0.2 (another address of this
    machine's loopback); bound to 0.0.0.0 (what every server did before), 127.0.0.2 answers."""
    loopback, everywhere = Metrics(), Metrics()
    port, wide_port = free_port(), free_port()
    servers = [loopback.serve(port, "127.0.0.1"), everywhere.serve(wide_port, "0.0.0.0")]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert "lodestar_searches_live" in reply.read().decode()
        assert not reachable("127.0.0.2", port)
        assert reachable("127.0.0.2", wide_port)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
