"""Access control: the token bucket (fake clock), API keys and rate limits on a real gateway
(our error shape and OpenAI's), and credentials against real servers: nats-server with a
password, an nkey and TLS; redis-server with a password."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis.exceptions
import torch

from common import bus
from common.errors import ConfigError
from common.settings import Settings
from common.store import open_store
from gateway.auth import RateLimiter, TokenBucket
from lego.stack import free_port, nats_server_binary, wait_port
from tests.conftest import redis_server_binary
from tests.gatewayutil import ServedGateway, served_gateway

# --- the token bucket, with a fake clock ----------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=3, now_s=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert bucket.take(100.0) == pytest.approx(0.5)  # empty: one token every 0.5 s
    assert bucket.take(100.25) == pytest.approx(0.25)  # a refused request takes nothing
    assert bucket.take(100.5) == 0.0
    assert bucket.take(100.5) == pytest.approx(0.5)


def test_token_bucket_refills_up_to_the_burst_only() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=2, now_s=0.0)
    assert bucket.take(0.0) == 0.0 and bucket.take(0.0) == 0.0
    # an hour idle refills 2 tokens, not 3600
    assert [bucket.take(3600.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    assert bucket.take(3599.0) == pytest.approx(1.0)  # a clock going back refills nothing


def test_token_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate_per_s=0.0, burst=1, now_s=0.0)
    with pytest.raises(ValueError):
        TokenBucket(rate_per_s=1.0, burst=0, now_s=0.0)


def test_rate_limiter_keeps_one_bucket_per_key() -> None:
    now = [10.0]
    limiter = RateLimiter(rate_per_s=0.5, burst=1, clock=lambda: now[0])
    assert limiter.check("alice") == 0.0
    assert limiter.check("alice") == pytest.approx(2.0)
    assert limiter.check("bob") == 0.0  # bob has his own bucket
    now[0] += 2.0
    assert limiter.check("alice") == 0.0


# --- API keys and rate limits on a real gateway ---------------------------------------------------

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789"}


@pytest.fixture
def guarded(settings: Settings) -> Iterator[ServedGateway]:
    # 2 requests per key, then one every 100 s: the third request is refused whatever the timing
    limited = settings.model_copy(update={"api_keys": KEYS, "rate_limit_rps": 0.01,
                                          "rate_limit_burst": 2})
    with served_gateway(limited) as served:
        yield served


def test_keys_required_on_v1_only(guarded: ServedGateway) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
        assert http.get("/openapi.json").status_code == 200

        for path in ("/v1/workflows", "/v1/generations/some-id/events"):
            missing = http.get(path)
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == "Bearer"
            assert missing.json()["error"]["code"] == "unauthorized"
            assert "Authorization: Bearer" in missing.json()["error"]["message"]

        wrong = http.get("/v1/workflows", headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert wrong.json()["error"] == {"code": "unauthorized", "message": "unknown API key"}
        not_bearer = http.get("/v1/workflows", headers={"Authorization": "Basic YTpi"})
        assert not_bearer.status_code == 401

        ok = http.get("/v1/workflows", headers={"Authorization": f"Bearer {KEYS['alice']}"})
        assert ok.status_code == 200 and ok.json() == {"workflows": []}


def test_rate_limit_per_key(guarded: ServedGateway) -> None:
    alice = {"Authorization": f"Bearer {KEYS['alice']}"}
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        assert [http.get("/v1/workflows", headers=alice).status_code for _ in range(2)] == [200,
                                                                                           200]
        limited = http.get("/v1/workflows", headers=alice)
        assert limited.status_code == 429
        assert 90 <= int(limited.headers["retry-after"]) <= 100
        error = limited.json()["error"]
        assert error["code"] == "rate_limited" and "alice" in error["message"]
        assert error["retry_after_s"] == pytest.approx(100, abs=10)
        # bob's bucket is his own; the open endpoints count for nobody
        bob = {"Authorization": f"Bearer {KEYS['bob']}"}
        assert http.get("/v1/workflows", headers=bob).status_code == 200
        assert http.get("/healthz", headers=alice).status_code == 200


def test_openai_route_answers_auth_errors_in_openai_shape(guarded: ServedGateway) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        missing = http.post("/v1/images/generations", json={"prompt": "x"})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json() == {"error": {
        "message": "missing API key: send the header 'Authorization: Bearer KEY'",
        "type": "authentication_error", "param": None, "code": "unauthorized"}}

    wrong = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.images.generate(model="txt2img", prompt="x")
    assert caught.value.code == "unauthorized"

    bob = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEYS["bob"], max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:  # the key passes; no such workflow
        bob.images.generate(model="no-such-workflow", prompt="x")
    assert caught.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        bob.images.generate(model="no-such-workflow", prompt="x")
    with pytest.raises(openai.RateLimitError) as caught:  # the third request of the burst of 2
        bob.images.generate(model="no-such-workflow", prompt="x")
    assert caught.value.type == "rate_limit_error" and caught.value.code == "rate_limited"
    assert int(caught.value.response.headers["retry-after"]) >= 90


# --- NATS credentials, against real nats-servers --------------------------------------------------


@pytest.fixture
def nats_with(tmp_path: Path):  # noqa: ANN201 - a factory of servers
    """Start a nats-server with extra arguments; all of them stop with the test."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> int:
        port = free_port()
        log = open(tmp_path / f"nats-{port}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port),
                                 *args], stdout=subprocess.DEVNULL, stderr=log)
        procs.append(proc)
        wait_port(port, proc, "nats-server")
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


async def _round_trip(settings: Settings) -> None:
    """Connect with ``settings`` and prove the connection works: a request answered."""
    nc = await bus.connect(settings, name="test-auth")
    try:
        async def echo(msg) -> None:  # noqa: ANN001
            await msg.respond(msg.data)

        sub = await nc.subscribe("auth.echo", cb=echo)
        assert (await nc.request("auth.echo", b"hi", timeout=5)).data == b"hi"
        await sub.unsubscribe()
    finally:
        await nc.close()


async def test_nats_user_and_password(nats_with) -> None:  # noqa: ANN001
    port = nats_with("--user", "lego", "--pass", "s3cret-pw")
    url = f"nats://127.0.0.1:{port}"
    await _round_trip(Settings(nats_url=url, nats_user="lego", nats_password="s3cret-pw"))
    for wrong in (Settings(nats_url=url, nats_user="lego", nats_password="wrong"),
                  Settings(nats_url=url)):
        # refused at once, not retried forever as an unreachable server is
        with pytest.raises(ConfigError, match="Authorization Violation") as caught:
            await asyncio.wait_for(bus.connect(wrong, name="test-auth"), 10)
        assert "nats_user/nats_password" in str(caught.value)


async def test_nats_nkey_seed_file(nats_with, tmp_path: Path) -> None:  # noqa: ANN001
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    (tmp_path / "user.nk").write_bytes(seed)
    (tmp_path / "nats.conf").write_text(f"authorization {{ users = [ {{ nkey: {public} }} ] }}\n")
    port = nats_with("-c", str(tmp_path / "nats.conf"))
    url = f"nats://127.0.0.1:{port}"
    await _round_trip(Settings(nats_url=url, nats_nkey_seed_file=tmp_path / "user.nk"))
    other = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    (tmp_path / "other.nk").write_bytes(other)
    with pytest.raises(ConfigError):
        await asyncio.wait_for(
            bus.connect(Settings(nats_url=url, nats_nkey_seed_file=tmp_path / "other.nk"), "t"),
            10)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificates(tmp: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "1", "-subj", "/CN=lego-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=tmp)
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN=lego-test-{name}", cwd=tmp)
        (tmp / f"{name}.ext").write_text(
            f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile",
                 f"{name}.ext", cwd=tmp)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_nats_tls_and_client_certificate(nats_with, tmp_path: Path) -> None:  # noqa: ANN001
    _certificates(tmp_path)
    server_tls = ("--tls", "--tlscert", str(tmp_path / "server.pem"),
                  "--tlskey", str(tmp_path / "server.key"))
    url = f"tls://127.0.0.1:{nats_with(*server_tls)}"
    await _round_trip(Settings(nats_url=url, nats_tls_ca_file=tmp_path / "ca.pem"))
    # the system's CAs do not know ours: refused at once
    with pytest.raises(ConfigError, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
        await asyncio.wait_for(bus.connect(Settings(nats_url=url), name="test-auth"), 10)

    # mutual TLS: the server asks for a client certificate signed by the CA
    mutual = nats_with(*server_tls, "--tlsverify", "--tlscacert", str(tmp_path / "ca.pem"))
    await _round_trip(Settings(
        nats_url=f"tls://127.0.0.1:{mutual}", nats_tls_ca_file=tmp_path / "ca.pem",
        nats_tls_cert_file=tmp_path / "client.pem", nats_tls_key_file=tmp_path / "client.key",
    ))


# --- Redis password, against a real redis-server --------------------------------------------------


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", "r3dis-pw"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc, "redis-server")
    yield port
    proc.terminate()
    proc.wait(10)


async def test_redis_password(redis_with_password: int) -> None:
    url = f"redis://127.0.0.1:{redis_with_password}/0"
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    for settings in (Settings(redis_url=url, redis_password="r3dis-pw"),
                     Settings(redis_url=url.replace("//", "//:r3dis-pw@"))):  # or in the URL
        store = open_store(settings)
        try:
            ref = await store.put("tmp/auth-test/t", tensor, ttl_s=60)
            assert torch.equal(await store.get(ref), tensor)
        finally:
            await store.close()
    store = open_store(Settings(redis_url=url))
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            await store.put("tmp/auth-test/t", tensor, ttl_s=60)
    finally:
        await store.close()
