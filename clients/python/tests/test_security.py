"""API keys and TLS against the real server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import reflex_client as rc
from reflex_client import EventStatus

ADMIN = "admin-key-0123456789"
INGEST = "ingest-key-0123456789"
RECOMMEND = "recommend-key-0123456789"


@pytest.fixture
def keyed_server(make_server, tmp_path: Path):
    keys = tmp_path / "keys.toml"
    keys.write_text(
        "".join(
            f'[[keys]]\nname = "{name}"\nkey = "{key}"\nscopes = ["{scope}"]\n\n'
            for name, key, scope in [
                ("ops", ADMIN, "admin"),
                ("tracker", INGEST, "ingest"),
                ("shop", RECOMMEND, "recommend"),
            ]
        )
    )
    return make_server({"REFLEX_AUTH__ENABLED": "true", "REFLEX_AUTH__KEYS_FILE": str(keys)})


def test_api_keys_and_scopes(keyed_server) -> None:
    target = keyed_server.target
    with rc.Client(target) as anonymous:
        with pytest.raises(rc.errors.Unauthenticated) as err:
            anonymous.recommend("u", 5)
        assert "API key" in err.value.details
    with rc.Client(target, api_key="not-a-key-0123456789") as stranger:
        with pytest.raises(rc.errors.Unauthenticated):
            stranger.recommend("u", 5)

    with rc.Client(target, api_key=INGEST) as tracker:
        with tracker.producer(linger_ms=1) as producer:
            fut = producer.send(user_id="kim", item_id="hat", kind="purchase")
            assert fut.result(timeout=30).status is EventStatus.ACCEPTED
        with pytest.raises(rc.errors.PermissionDenied) as denied:
            tracker.get_profile("kim")
        assert "scope" in denied.value.details

    with rc.Client(target, api_key=RECOMMEND) as shop:
        assert shop.recommend("kim", 3).model_version
        with pytest.raises(rc.errors.PermissionDenied):
            shop.ingest([{"user_id": "kim", "item_id": "hat"}])
        # A producer without the scope fails every pending event and refuses more.
        producer = shop.producer(linger_ms=1)
        fut = producer.send(user_id="kim", item_id="scarf")
        with pytest.raises(rc.errors.PermissionDenied):
            fut.result(timeout=30)
        with pytest.raises(rc.errors.PermissionDenied):
            producer.send(user_id="kim", item_id="gloves")
        producer.close()

    with rc.Client(target, api_key=ADMIN) as ops:
        assert ops.get_profile("kim").kind_counts["purchase"] == 1
        assert len(ops.list_versions().serving) > 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_a_private_ca(make_server, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server = make_server(
        {
            "REFLEX_TLS__ENABLED": "true",
            "REFLEX_TLS__CERT_FILE": str(cert),
            "REFLEX_TLS__KEY_FILE": str(key),
        }
    )
    tls = rc.TlsOptions(root_certificates=cert.read_bytes(), server_name="localhost")
    with rc.Client(server.target, tls=tls) as client:
        results = client.ingest([{"user_id": "tls", "item_id": "lock", "kind": "view"}])
        assert results[0].status is EventStatus.ACCEPTED
        with client.producer(linger_ms=1) as producer:
            assert producer.send(user_id="tls", item_id="key").result(timeout=30).applied
        assert client.get_profile("tls").kind_counts["view"] == 2
    # Plaintext to a TLS server fails, and so does TLS without the private CA.
    with rc.Client(server.target, timeout=5) as plain, pytest.raises(rc.errors.ReflexError):
        plain.recommend("tls", 1)
    with (
        rc.Client(
            server.target, tls=rc.TlsOptions(server_name="localhost"), timeout=5
        ) as untrusted,
        pytest.raises(rc.errors.Unavailable),
    ):
        untrusted.recommend("tls", 1)
