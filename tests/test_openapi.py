"""The OpenAPI document tells the truth: every ``$ref`` resolves, every body and every status a
route answers is declared, and schemathesis, with all its checks, finds nothing against a real
gateway (on a real nats-server, without nodes).

Without nodes a request stays queued until its deadline, so the gateway here gives every
request a short one (the workflows declare a tiny solo latency, ``max_deadline_s`` is 1 s):
a ``?wait`` or an SSE stream then ends within about two seconds, and the OpenAI route, which
answers once its images are done, answers 504 (documented: not done in time; its wait limit
is cut to half a second here). Admission control is off: with nothing measured there is
nothing to admit against."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest

from common.history import encode_cursor
from common.messages import ENVELOPE_KEYS, RequestState
from common.settings import Settings
from common.workflow import builtin_workflows
from gateway import openai_api, openapi
from gateway.app import create_app
from tests.conftest import nats_server
from tests.gatewayutil import ServedGateway, served_gateway

pytestmark = pytest.mark.timeout(240)

KEY = "sk-openapi-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_KEY = "sk-openapi-admin-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
#: how long schemathesis may run (it spreads the time over its phases)
SCHEMATHESIS_S = 45


def _settings(tmp: Path, nats_url: str, cache_dir: Path, **extra: object) -> Settings:
    return Settings(nats_url=nats_url, cache_dir=cache_dir, shm_root=tmp / "shm",
                    run_dir=tmp / "run", admission=False, slo_min_s=0.2, max_deadline_s=1,
                    **extra)


def _text_workflows() -> dict:
    """The shipped workflows of the default base model's family without an image parameter
    (an image's content is more than a schema can say), each declaring a tiny solo latency:
    requests get a short deadline."""
    return {name: spec.model_copy(update={"solo_latency_s": 0.05})
            for name, spec in builtin_workflows({"base": "builtin:tiny-sd"}).items()
            if all(p.type != "image" for p in spec.params.values())}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
            ) -> Iterator[ServedGateway]:
    tmp = tmp_path_factory.mktemp("openapi")
    with nats_server(tmp / "nats") as url, pytest.MonkeyPatch.context() as patch:
        patch.setattr(openai_api, "WAIT_S", 0.5)
        # schemathesis has a key without the admin scope: the workflow routes answer it 403,
        # as documented (with it, it replaced the short-deadline workflows with its own)
        settings = _settings(tmp, url, cache_dir, api_keys={
            "test": KEY, "admin": {"token": ADMIN_KEY, "scopes": ["admin"]}})
        with served_gateway(settings, _text_workflows()) as served:
            yield served


@pytest.fixture(scope="module")
def doc(gateway: ServedGateway) -> dict:
    return httpx.get(f"{gateway.url}/openapi.json", timeout=30).json()


def _validator(doc: dict, component: str) -> jsonschema.Draft202012Validator:
    """A validator of ``component``, whose refs resolve inside ``doc``."""
    return jsonschema.Draft202012Validator({**doc, "$ref": f"#/components/schemas/{component}"})


# --- the document -----------------------------------------------------------------------------

def test_every_ref_resolves(doc: dict) -> None:
    assert openapi.dangling(doc) == []
    assert "$defs" not in json.dumps(doc)
    assert not [r for r in openapi.refs(doc) if not r.startswith("#/components/")]
    accepted = doc["paths"]["/v1/generations"]["post"]["responses"]["202"]
    assert accepted["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Generation"}
    jsonschema.Draft202012Validator.check_schema(doc["components"]["schemas"]["Generation"])


def test_every_body_is_declared(doc: dict) -> None:
    workflows = doc["paths"]["/v1/workflows"]["post"]["requestBody"]
    assert workflows["required"] is True
    assert set(workflows["content"]) == {"application/json", "application/yaml"}
    assert workflows["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/WorkflowSpec"}
    for path, method, operation in openapi._operations(doc):
        if method in ("post", "put", "patch"):
            assert operation["requestBody"]["required"] is True, (method, path)


def test_every_status_is_declared_with_the_error_json(doc: dict) -> None:
    for path, method, operation in openapi._operations(doc):
        responses = operation["responses"]
        if not path.startswith("/v1/"):
            assert "security" not in operation and "401" not in responses, path
            continue
        # API keys are on: every /v1 route answers 401 without one, and says so
        assert operation["security"] == [{"HTTPBearer": []}], (method, path)
        assert responses["401"]["headers"]["WWW-Authenticate"], (method, path)
        assert "Retry-After" in responses["503"]["headers"], (method, path)
        if "{" in path:
            assert "404" in responses, (method, path)
        error = "OpenAIError" if openapi.OPENAI_TAG in operation.get("tags", ()) else \
            "ErrorResponse"
        for status, answer in responses.items():
            if status[0] in "45":
                schema = answer["content"]["application/json"]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{error}"}, (method, path)
    post = doc["paths"]["/v1/generations"]["post"]["responses"]
    assert {"200", "202", "401", "404", "409", "413", "422", "503"} <= set(post)
    assert set(doc["paths"]["/v1/generations/{request_id}"]["delete"]["responses"]) >= {
        "200", "404", "409"}
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_without_keys_nothing_asks_for_one(tmp_path: Path, cache_dir: Path) -> None:
    settings = _settings(tmp_path, "nats://127.0.0.1:1", cache_dir)
    doc = create_app(settings).openapi()  # not started: no workflow registered yet
    assert openapi.dangling(doc) == []
    assert "securitySchemes" not in doc["components"]
    for _, _, operation in openapi._operations(doc):
        assert "security" not in operation and "401" not in operation["responses"]
    limited = settings.model_copy(update={"api_keys": {"a": KEY}, "rate_limit_rps": 1.0})
    for _, _, operation in openapi._operations(create_app(limited).openapi()):
        if "security" in operation:
            assert operation["responses"]["429"]["headers"]["Retry-After"]


def test_the_schema_says_what_a_generation_requires(gateway: ServedGateway, doc: dict) -> None:
    request = _validator(doc, "GenerationRequest")
    assert not request.is_valid({})  # txt2img, the default, requires a prompt
    assert not request.is_valid({"prompt": "x", "no_such_field": 1})
    assert not request.is_valid({"prompt": "x", "width": 60})  # not a multiple of 8
    assert request.is_valid({"prompt": "x", "steps": None, "id": "a-1"})  # null: the default
    assert request.is_valid({"workflow": "txt2img-hires", "prompt": "x", "upscale_steps": 2})
    assert not request.is_valid({"workflow": "txt2img", "prompt": "x", "upscale_steps": 2})
    assert not request.is_valid({"prompt": "x", "webhook_url": "http://h/"})  # webhooks off
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
        empty = http.post("/v1/generations", json={})
        assert empty.status_code == 422 and empty.json()["error"]["field"] == "prompt"
        hook = http.post("/v1/generations", json={"prompt": "x", "webhook_url": "http://h/"})
        assert hook.status_code == 422 and hook.json()["error"]["field"] == "webhook_url"
        accepted = http.post("/v1/generations", json={"prompt": "x", "steps": None})
        assert accepted.status_code == 202, accepted.text
        assert _validator(doc, "Generation").is_valid(accepted.json())


def test_the_openai_schema_refuses_what_the_route_refuses(gateway: ServedGateway,
                                                          doc: dict) -> None:
    images = _validator(doc, "ImagesRequest")
    assert images.is_valid({"prompt": "x", "size": "64x48", "n": 2, "seed": 3})
    for bad in ({"prompt": "x", "unknown": 1}, {"prompt": "x", "size": "60x64"},
                {"prompt": "x", "size": "064x64"}, {"prompt": "x", "workflow": "txt2img"},
                {"prompt": "x", "output_quality": 50}, {"prompt": "x", "model": ""},
                {"prompt": "x", "user": 5}):
        assert not images.is_valid(bad), bad
        with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
            refused = http.post("/v1/images/generations", json=bad)
        assert refused.status_code in (404, 422), (bad, refused.text)
        assert _validator(doc, "OpenAIError").is_valid(refused.json())


def test_every_envelope_key_is_documented(tmp_path: Path, cache_dir: Path) -> None:
    spec = builtin_workflows()["txt2img"]
    hooks = _settings(tmp_path, "nats://127.0.0.1:1", cache_dir, webhook_allow=["*"],
                      webhook_secret="s")
    documented = set(openapi.generation_request(spec, hooks)["properties"])
    assert documented >= ENVELOPE_KEYS | set(spec.params)
    schema = openapi.generation_request(spec, hooks)
    validator = jsonschema.Draft202012Validator(schema)
    assert not validator.is_valid({"prompt": "x", "webhook_events": ["started"]})
    assert validator.is_valid({"prompt": "x", "webhook_url": "http://h/", "webhook_events":
                               ["started", "completed"]})
    off = set(openapi.generation_request(spec, _settings(tmp_path, "nats://127.0.0.1:1",
                                                         cache_dir))["properties"])
    assert not off & {"webhook_url", "webhook_events"}  # webhooks off: refused


def test_openai_n_and_seeds() -> None:
    specs = builtin_workflows()
    raws, _ = openai_api.to_requests({"prompt": "x", "n": 2.0, "seed": 4294967295}, specs)
    assert [r["seed"] for r in raws] == [4294967295, 0]  # wraps past the seed's maximum
    raws, _ = openai_api.to_requests({"prompt": "x", "n": 3, "seed": 7}, specs)
    assert [r["seed"] for r in raws] == [7, 8, 9]


def test_405_names_every_method_of_the_path(gateway: ServedGateway) -> None:
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
        for path, allowed in (("/v1/workflows", "GET, POST"),
                              ("/v1/generations/some-id", "DELETE, GET")):
            answer = http.request("OPTIONS", path)
            assert answer.status_code == 405
            assert answer.headers["allow"] == allowed
            assert answer.json()["error"]["code"] == "method_not_allowed"


def test_history_filters_answer_rather_than_fail(gateway: ServedGateway) -> None:
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
        future = http.get("/v1/generations", params={"since": 2.1e16})  # was a 500
        assert future.status_code == 200 and future.json()["data"] == []
        assert http.get("/v1/generations", params={"limit": 0}).status_code == 422


def test_a_workflow_whose_models_the_gateway_cannot_read_is_refused(
        gateway: ServedGateway) -> None:
    spec = builtin_workflows()["txt2img"].model_dump(exclude_defaults=True)
    unreadable = {**spec, "name": "unreadable", "models": {"base": "/no/such/model"}}
    no_alias = {**spec, "name": "no-alias", "params": {
        **spec["params"], "prompt": {**spec["params"]["prompt"], "tokenizer": "other"}}}
    with httpx.Client(base_url=gateway.url, headers=ADMIN, timeout=60) as http:
        # registered, each would answer every request with a 500 (and fail the next start)
        refused = http.post("/v1/workflows", json=unreadable)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["field"] == "models.base"
        refused = http.post("/v1/workflows", json=no_alias)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["field"] == "params.prompt.tokenizer"
        names = [w["name"] for w in http.get("/v1/workflows").json()["workflows"]]
        assert "unreadable" not in names and "no-alias" not in names
        # a lone surrogate ("\ud800" in JSON or YAML) is no text: it was a 500
        surrogate = json.dumps({**spec, "name": "surrogate", "description": "\ud800"})
        refused = http.post("/v1/workflows", content=surrogate.encode(),
                            headers={"Content-Type": "application/json"})
        assert refused.status_code == 422, refused.text
        assert "Unicode" in refused.json()["error"]["message"]


# --- schemathesis ------------------------------------------------------------------------------

def _config(path: Path) -> Path:
    # A page's cursor is opaque (base64 of what the last item was): no schema can tell a
    # valid one, so the run uses a real one rather than random strings.
    cursor = encode_cursor(RequestState(id="z", workflow="txt2img", status="queued",
                                        created_at=time.time(), updated_at=0.0))
    path.write_text(f"""
seed = 20240601
max-time = {SCHEMATHESIS_S}
request-timeout = 10
workers = 1
max-stream-events = 1

[generation]
max-examples = 25

[checks]
enabled = true  # every check: conformance of statuses, content types, headers and bodies,
                # server errors, positive and negative data, auth, methods, ...

[auth.openapi.HTTPBearer]
bearer = "{KEY}"

[parameters]
"query.cursor" = "{cursor}"

# DELETE /v1/generations/{{id}} cancels a request; its state stays readable (status
# "cancelled") for result_ttl_s, by design: it is no use-after-free.
[checks.use_after_free]
enabled = false

# A workflow's graph (nodes naming known models and kinds, edges naming existing outputs, no
# cycle) is more than JSON Schema can say: a spec valid by the schema may still be refused.
[[operations]]
include-path = "/v1/workflows"
include-method = "POST"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path = "/v1/workflows/{{name}}"
include-method = "PUT"
checks.positive_data_acceptance.enabled = false

# No node serves this gateway: every image request the route accepts ends, as documented,
# in 504 (not done within the route's wait, or past its deadline).
[[operations]]
include-path = "/v1/images/generations"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]
""")
    return path


def test_schemathesis_finds_no_failure(gateway: ServedGateway, doc: dict,
                                       tmp_path: Path) -> None:
    operations = len(list(openapi._operations(doc)))
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--no-color",
         "--config-file", str(_config(tmp_path / "schemathesis.toml")),
         "run", f"{gateway.url}/openapi.json"],
        capture_output=True, text=True, timeout=SCHEMATHESIS_S + 120, cwd=tmp_path,
    )
    took = time.monotonic() - started
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[output.find("ERRORS"):] if "ERRORS" in output else \
        output[output.find("FAILURES"):] if "FAILURES" in output else output
    assert f"Tested: {operations}\n" in output  # every operation of the document
    assert took < SCHEMATHESIS_S + 60, took
