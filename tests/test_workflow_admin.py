"""Registering workflows is an admin act: a workflow names only models the operator allowed
(builtins, names from configuration, model directories under the model roots that its nodes
can load); registering, replacing and deleting need the ``admin`` scope (without API keys: a
client on the gateway's host); a registered name is not overwritten by POST; DELETE
unregisters on every replica; and a broken entry in the registry never stops a gateway from
starting. Gateways on a real nats-server (no nodes)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common import bus, subjects
from common.errors import InvalidRequest
from common.modelrefs import check_model_refs
from common.settings import Settings
from common.workflow import builtin_workflows, parse_workflow
from tests.conftest import nats_server
from tests.gatewayutil import served_gateway
from tests.test_workflow import SD_COMPONENTS, sd_dir

pytestmark = pytest.mark.timeout(180)

ADMIN_KEY = "sk-admin-0123456789"
USER_KEY = "sk-user-0123456789"


def _settings(tmp: Path, cache_dir: Path, nats_url: str = "nats://127.0.0.1:1",
              **extra: object) -> Settings:
    return Settings(nats_url=nats_url, cache_dir=cache_dir, shm_root=tmp / "shm",
                    run_dir=tmp / "run", admission=False, model_roots=[tmp / "models"],
                    **extra)


def _spec(name: str, model: str, workflow: str = "txt2img", alias: str = "base") -> dict:
    spec = builtin_workflows()[workflow].model_dump(exclude_defaults=True)
    return {**spec, "name": name, "models": {**spec["models"], alias: model}}


def _refused(spec: dict, settings: Settings) -> dict:
    with pytest.raises(InvalidRequest) as caught:
        check_model_refs(parse_workflow(spec), settings)
    return caught.value.to_dict()


# --- which models a workflow may name (pure: the file system only) ---------------------------

def test_model_references_are_limited_to_what_the_operator_allowed(
        tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "models").mkdir()
    settings = _settings(tmp_path, cache_dir, models={"sd": str(tmp_path / "models" / "sd")})
    good = sd_dir(tmp_path / "models", "sd")
    assert check_model_refs(parse_workflow(_spec("a", "builtin:tiny-sd")), settings)
    assert check_model_refs(parse_workflow(_spec("a", str(good))), settings).models["base"] \
        == str(good)
    # a name from configuration is replaced by the model it names
    assert check_model_refs(parse_workflow(_spec("a", "sd")), settings).models["base"] \
        == str(good)
    cwd = os.getcwd()
    try:  # relative, resolving inside a root
        os.chdir(tmp_path)
        assert check_model_refs(parse_workflow(_spec("a", "models/sd")), settings)
    finally:
        os.chdir(cwd)

    (tmp_path / "models" / "file").write_text("x")
    (tmp_path / "models" / "empty").mkdir()
    (tmp_path / "outside").mkdir()
    sd_dir(tmp_path / "outside", "sd")
    (tmp_path / "models" / "link").symlink_to(tmp_path / "outside" / "sd")
    no_checker = sd_dir(tmp_path / "models", "no-checker", index={
        **SD_COMPONENTS, "safety_checker": [None, None]})
    for model, rule in (
        ("https://example.com/sd.safetensors", "is a URL"),
        ("s3://bucket/sd", "is a URL"),
        ("builtin:nope", "unknown builtin"),
        ("/etc", "outside the model roots"),
        (f"{tmp_path}/models/../../../../etc", "outside the model roots"),
        (f"{tmp_path}/models/sd/../../outside/sd", "outside the model roots"),
        (str(tmp_path / "models" / "link"), "outside the model roots"),  # a symlink out
        (str(tmp_path / "models" / "file"), "not a directory"),
        (str(tmp_path / "models" / "empty"), "no model_index.json"),
    ):
        error = _refused(_spec("a", model), settings)
        assert error["field"] == "models.base", (model, error)
        assert rule in error["message"], (model, error)
    from common.models import builtin_names

    assert _refused(_spec("a", "builtin:nope"), settings)["limit"] == [
        f"builtin:{name}" for name in builtin_names()]
    assert "builtin:tiny-sd" in [f"builtin:{name}" for name in builtin_names()]
    # a directory of the wrong family: the safety checker node cannot load from it
    error = _refused(_spec("a", str(no_checker), "txt2img-safe"), settings)
    assert error["field"] == "models.base" and "safety_checker" in error["message"]
    assert check_model_refs(parse_workflow(_spec("a", str(no_checker))), settings)


def test_scopes_come_with_the_keys(tmp_path: Path, cache_dir: Path) -> None:
    mapped = Settings(api_keys={"ops": {"token": ADMIN_KEY, "scopes": ["admin"]},
                                "app": USER_KEY})
    assert mapped.api_keys == {"ops": ADMIN_KEY, "app": USER_KEY}
    assert mapped.api_key_scopes == {"ops": ["admin"]}
    assert Settings(api_keys=[USER_KEY]).api_key_scopes == {}  # the old forms still work
    with pytest.raises(ValueError, match="unknown scopes"):
        Settings(api_keys={"a": USER_KEY}, api_key_scopes={"a": ["root"]})
    with pytest.raises(ValueError, match="none of the api_keys"):
        Settings(api_keys={"a": USER_KEY}, api_key_scopes={"b": ["admin"]})


# --- against gateways on a real nats-server --------------------------------------------------

@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    with nats_server(tmp_path / "nats") as url:
        yield url


def test_without_keys_only_a_local_client_administers_workflows(
        tmp_path: Path, cache_dir: Path, nats_url: str) -> None:
    (tmp_path / "models").mkdir()
    settings = _settings(tmp_path, cache_dir, nats_url)
    with served_gateway(settings, builtin_workflows()) as served, \
            httpx.Client(base_url=served.url, timeout=60) as http:
        for model in ("/etc", "../../../../etc", "https://example.com/m", "builtin:nope"):
            # the upscaler: a model no request validation reads (were 201)
            for alias, workflow in (("base", "txt2img"), ("upscaler", "txt2img-hires")):
                refused = http.post("/v1/workflows", json=_spec("evil", model, workflow, alias))
                assert refused.status_code == 422, refused.text
                assert refused.json()["error"]["field"] == f"models.{alias}"
        assert http.post("/v1/workflows", json=_spec("mine", "builtin:tiny-sd")).status_code \
            == 201
        # a registered name, shipped or not, is not overwritten by POST
        for name in ("mine", "txt2img"):
            again = http.post("/v1/workflows", json=_spec(name, "builtin:tiny-sd"))
            assert again.status_code == 409, again.text
            assert "PUT" in again.json()["error"]["message"]
        # the explicit replace
        quick = _spec("txt2img", "builtin:tiny-sd")
        quick["params"]["steps"]["default"] = 3
        replaced = http.put("/v1/workflows/txt2img", json=quick)
        assert replaced.status_code == 200, replaced.text
        assert served.gateway.registry.get("txt2img").params["steps"].default == 3
        other = http.put("/v1/workflows/other", json=quick)  # the body names another
        assert other.status_code == 422 and other.json()["error"]["field"] == "name"
        assert http.put("/v1/workflows/other", json=_spec("other", "/etc")).status_code == 422
        # through a proxy, a loopback peer is no local client
        proxied = http.post("/v1/workflows", json=_spec("p", "builtin:tiny-sd"),
                            headers={"X-Forwarded-For": "203.0.113.9"})
        assert proxied.status_code == 403, proxied.text
        assert proxied.json()["error"] == {**proxied.json()["error"], "code": "forbidden",
                                           "scope": "admin"}
        assert http.delete("/v1/workflows/mine", headers={"Forwarded": "for=203.0.113.9"}
                           ).status_code == 403
        names = {w["name"] for w in http.get("/v1/workflows").json()["workflows"]}
        assert "evil" not in names and "p" not in names and "mine" in names


def test_admin_scope_and_delete_on_every_replica(
        tmp_path: Path, cache_dir: Path, nats_url: str) -> None:
    settings = _settings(tmp_path, cache_dir, nats_url, api_keys={
        "ops": {"token": ADMIN_KEY, "scopes": ["admin"]}, "app": USER_KEY})
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    user = {"Authorization": f"Bearer {USER_KEY}"}
    spec = _spec("mine", "builtin:tiny-sd")
    with served_gateway(settings, builtin_workflows()) as one, \
            served_gateway(settings, run_ingress=False) as two, \
            httpx.Client(timeout=60) as http:
        for answer in (http.post(f"{one.url}/v1/workflows", json=spec, headers=user),
                       http.put(f"{one.url}/v1/workflows/txt2img", json=spec, headers=user),
                       http.delete(f"{one.url}/v1/workflows/txt2img", headers=user)):
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"]["code"] == "forbidden"
            assert answer.json()["error"]["scope"] == "admin"
        assert http.get(f"{one.url}/v1/workflows", headers=user).status_code == 200
        assert http.post(f"{one.url}/v1/workflows", json=spec, headers=admin).status_code == 201
        assert _eventually(lambda: "mine" in two.gateway.registry.all())
        # a shipped workflow may be deleted by an admin (the next `lego up` seeds it again)
        for name in ("mine", "img2img"):
            gone = http.delete(f"{one.url}/v1/workflows/{name}", headers=admin)
            assert gone.status_code == 204, gone.text
            assert _eventually(lambda n=name: n not in two.gateway.registry.all())
            names = {w["name"] for w in
                     http.get(f"{two.url}/v1/workflows", headers=user).json()["workflows"]}
            assert name not in names
        for name in ("mine", "nope", "bad%20name"):
            missing = http.delete(f"{one.url}/v1/workflows/{name}", headers=admin)
            assert missing.status_code == 404, missing.text
        assert http.post(f"{one.url}/v1/workflows", json=spec, headers=admin).status_code == 201
    # a gateway seeding the shipped workflows but img2img starts over its deleted entry
    seed = {k: v for k, v in builtin_workflows().items() if k != "img2img"}
    with served_gateway(settings, seed) as three:
        assert set(three.gateway.registry.all()) == set(seed) | {"mine"}


def test_a_broken_registered_workflow_does_not_stop_a_gateway(
        tmp_path: Path, cache_dir: Path, nats_url: str) -> None:
    settings = _settings(tmp_path, cache_dir, nats_url)
    unreadable = _spec("unreadable", "/etc")  # its prompt's tokenizer cannot be read

    async def write() -> None:
        nc = await bus.connect(settings, name="test")
        try:
            bucket = (await bus.ensure_topology(nc.jetstream(), settings))[
                subjects.WORKFLOW_BUCKET]
            await bucket.put("garbage", b"{not: [a workflow")
            await bucket.put("unreadable", json.dumps(unreadable).encode())
        finally:
            await bus.close(nc)

    bus.run_async(write())
    with served_gateway(settings, builtin_workflows(), start_timeout_s=60) as served, \
            httpx.Client(base_url=served.url, timeout=60) as http:
        assert http.get("/readyz").status_code == 200
        names = {w["name"] for w in http.get("/v1/workflows").json()["workflows"]}
        assert set(builtin_workflows()) <= names and "garbage" not in names
        accepted = http.post("/v1/generations", json={"workflow": "txt2img", "prompt": "x"})
        assert accepted.status_code == 202, accepted.text
        # an admin may delete what cannot even be parsed
        assert http.delete("/v1/workflows/garbage").status_code == 204


def _eventually(check, timeout_s: float = 10.0) -> bool:  # noqa: ANN001
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()
