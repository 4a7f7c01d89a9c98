"""NATS over TLS and mutual TLS, with certificates made in the test (trustme)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import trustme

from chorus.auth import init_auth
from chorus.config import Settings
from chorus.errors import NatsTlsFailed
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer, ServerTls
from tests.cli import achorus, one_line_error


class Pki(msgspec.Struct, frozen=True):
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("chorus-client@example.test")
    paths = {name: folder / f"{name}.pem" for name in Pki.__struct_fields__}
    ca.cert_pem.write_to_path(paths["ca"])
    server.private_key_pem.write_to_path(paths["server_key"])
    client.private_key_pem.write_to_path(paths["client_key"])
    for cert, path in ((server, paths["server_cert"]), (client, paths["client_cert"])):
        path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return Pki(**{name: str(path) for name, path in paths.items()})


def tls_server(tmp_path: Path, pki: Pki, *, verify: bool) -> Iterator[NatsServer]:
    tls = ServerTls(
        cert_file=pki.server_cert,
        key_file=pki.server_key,
        ca_file=pki.ca if verify else None,
        verify=verify,
    )
    server = NatsServer(tmp_path / "js", tls=tls).start()
    yield server
    server.stop()


@pytest.fixture
def tls_only(tmp_path: Path, pki: Pki) -> Iterator[NatsServer]:
    yield from tls_server(tmp_path, pki, verify=False)


@pytest.fixture
def mutual_tls(tmp_path: Path, pki: Pki) -> Iterator[NatsServer]:
    yield from tls_server(tmp_path, pki, verify=True)


async def round_trip(settings: Settings) -> bytes:
    nc = await connect(settings, "test-tls")
    try:
        sub = await nc.subscribe("tls.echo")
        await nc.publish("tls.echo", b"over tls")
        return (await sub.next_msg(timeout=5)).data
    finally:
        await nc.close()


async def test_a_client_with_the_ca_connects_over_tls(tls_only: NatsServer, pki: Pki) -> None:
    settings = Settings(nats_url=tls_only.url, tls_ca=pki.ca)

    assert await round_trip(settings) == b"over tls"


async def test_a_client_without_the_ca_is_refused_with_what_to_set(
    tls_only: NatsServer,
) -> None:
    with pytest.raises(NatsTlsFailed) as raised:
        await connect(Settings(nats_url=tls_only.url, connect_wait=1), "test-tls")

    assert "certificate verify failed" in raised.value.reason
    assert "set NATS_TLS_CA" in raised.value.reason


async def test_the_cli_without_the_ca_fails_with_one_line(
    tls_only: NatsServer, settings: Settings
) -> None:
    result = await achorus(
        msgspec.structs.replace(settings, nats_url=tls_only.url), "agents", "--json"
    )

    assert "set NATS_TLS_CA" in one_line_error(result)


async def test_mtls_refuses_a_client_without_a_certificate(
    mutual_tls: NatsServer, pki: Pki
) -> None:
    settings = Settings(nats_url=mutual_tls.url, tls_ca=pki.ca, connect_wait=1)

    with pytest.raises(NatsTlsFailed) as raised:
        await connect(settings, "test-tls")

    assert "NATS_TLS_CERT" in raised.value.reason


async def test_mtls_accepts_a_client_with_a_certificate(mutual_tls: NatsServer, pki: Pki) -> None:
    settings = Settings(
        nats_url=mutual_tls.url, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key
    )

    assert await round_trip(settings) == b"over tls"


async def test_auth_init_with_tls_writes_a_server_config_clients_reach_over_tls(
    tmp_path: Path, pki: Pki
) -> None:
    tls = ServerTls(cert_file=pki.server_cert, key_file=pki.server_key, ca_file=pki.ca)
    layout = init_auth(tmp_path / "auth", [], tls=tls)
    server = NatsServer(tmp_path / "js", config_file=str(layout.server_config)).start()
    try:
        operator = layout.settings_for("operator", Settings(nats_url=server.url))
        env = layout.env_file("operator").read_text()

        echoed = await round_trip(msgspec.structs.replace(operator, tls_ca=pki.ca))
    finally:
        server.stop()

    assert echoed == b"over tls"
    assert f"NATS_TLS_CA={pki.ca}" in env
    assert "verify" not in layout.server_config.read_text()
