"""One typed settings object per process, read once at start-up and passed down.

Values come from keyword arguments, then ``LEGO_*`` environment variables (plus the usual
``NATS_URL`` and ``REDIS_URL``), then an optional TOML/JSON/YAML config file named by
``LEGO_CONFIG``. Nothing else in the code base reads ``os.environ``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.kinds import exclusive_kinds
from common.messages import ParallelMode, StepPart

#: what an API key may be allowed besides the rest of the API: ``admin`` registers, replaces
#: and deletes workflows
API_KEY_SCOPES = ("admin",)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "legodiffusion"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LEGO_", extra="ignore", frozen=True, populate_by_name=True
    )

    # --- servers -----------------------------------------------------------------------------
    nats_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("NATS_URL", "LEGO_NATS_URL"),
        description="NATS server with JetStream, or the servers of a NATS cluster separated by "
        "commas (nats://a:4222,nats://b:4222,...; a list in a config file); the clients "
        "reconnect to a surviving one; None: `lego up` starts an embedded one.",
    )
    nats_user: str | None = None
    nats_password: str | None = None
    nats_creds_file: Path | None = None
    nats_nkey_seed_file: Path | None = Field(None, description="NKEY seed file (nkey auth)")
    nats_tls_ca_file: Path | None = Field(None, description="CA bundle that signed the server")
    nats_tls_cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    nats_tls_key_file: Path | None = Field(None, description="the client certificate's key")
    nats_inbox_prefix: str | None = Field(
        None, description="reply inboxes under this prefix (the client account of "
        "deploy/nats-accounts.conf may read only _INBOX_client.>)",
    )
    stream_replicas: int = Field(
        1, ge=1, le=5, description="JetStream replicas of streams, buckets and durable "
        "consumers (3 on a 3-node NATS cluster, so each survives a node; a stack started at "
        "3 raises what an earlier one made at 1)",
    )
    nats_failover_s: float = Field(
        15.0, ge=0, description="how long a JetStream write or read is tried again while its "
        "stream has no leader (a NATS cluster that lost a server elects another within "
        "seconds) or the client moves to another server, before the work at hand fails",
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "LEGO_REDIS_URL"),
        description="Redis for tensors; None: the host shared-memory store.",
    )
    redis_password: str | None = Field(
        None, description="Redis AUTH password (unless REDIS_URL carries one)"
    )

    # --- tensor store ------------------------------------------------------------------------
    shm_root: Path = Path("/dev/shm/legodiffusion")
    tensor_ttl_s: float = Field(900.0, gt=0, description="safety net for intermediate tensors")
    result_ttl_s: float = Field(3600.0, gt=0, description="how long finished images are kept")

    # --- models ------------------------------------------------------------------------------
    cache_dir: Path = Field(default_factory=default_cache_dir)
    base_model: str = Field(
        "builtin:tiny-sd",
        description="model directory used by the shipped workflows of its family (a diffusers "
        "SD 1.x/2.x, SDXL, SD3 or FLUX.1 directory, or builtin:NAME)",
    )
    upscaler_model: str = "builtin:tiny-upscaler"
    lora_dir: Path | None = Field(
        None, description="where the LoRAs a request names are: NAME.safetensors, in diffusers' "
        "format; read on each request's first use, so new files need no restart")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="named models a workflow registered at run time may use by name, "
        "{name: model directory or builtin:...}, e.g. {sd15: /data/models/sd15}; `base` and "
        "`upscaler` always name base_model and upscaler_model",
    )
    model_roots: list[Path] = Field(
        default_factory=list,
        description="directories under which a workflow registered at run time may name a "
        "model directory (symlinks followed, no way out); empty: cache_dir/models only",
    )
    workflows: list[str] = Field(
        default_factory=list, description="shipped workflows `lego up` registers (empty: all)"
    )
    device: str = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="the models' weights' dtype; auto: float32 on a CPU, else the "
        "family's (float16; bfloat16 for FLUX)")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per node process")

    # --- delivery ----------------------------------------------------------------------------
    ack_wait_s: float = Field(
        2.0, gt=0, description="a task or request not acked for this long is delivered again "
        "(a replica that died holding it); live replicas send in-progress acks every quarter "
        "of it, however long their task runs",
    )
    max_deliver: int = Field(3, ge=1)
    max_ack_pending: int = Field(64, ge=1)
    retry_backoff_s: float = Field(0.5, ge=0)
    max_batch: int = Field(8, ge=1, description="default max batch of a node")
    drain_timeout_s: float = Field(120.0, gt=0)
    deadline_sweep_s: float = Field(
        10.0, gt=0, description="every ingress replica ends, this often, the unfinished "
        "requests past their deadline that no live replica watches",
    )

    # --- device hosts (services/host.py) -------------------------------------------------------
    host_scheduler: Literal["least_slack", "fifo"] = Field(
        "least_slack", description="which held task a device runs next: least deadline slack "
        "(the work ahead of it counted), or arrival order",
    )
    host_eligible_s: float = Field(
        0.01, ge=0, description="a host fetches another pool's task only while the work it "
        "holds for its other pools is under this (pull when nearly idle)",
    )
    host_fetch_lead_s: float = Field(
        0.005, ge=0, description="a busy host takes queued work this long before its running "
        "step is expected to end (a fetch's round trip and the task's admission), so that the "
        "task is held by the step boundary and runs next rather than a step later",
    )
    host_poll_s: float = Field(
        0.25, gt=0, description="longest wait of one fetch of a nearly idle host: a host "
        "that gets busy meanwhile may still receive the task (it then hands it back)",
    )
    host_probe_s: float = Field(
        0.002, gt=0, description="longest wait of one fetch of a busy host, which takes only "
        "work already queued (to run at a step boundary): new arrivals go to idle devices",
    )
    host_max_handoffs: int = Field(
        8, ge=0, description="times a task fetched by a host that got busy meanwhile may be "
        "handed back to its queue for an idle device (then the host keeps it)",
    )
    parallel: ParallelMode = Field(
        "off", description="CFG parallelism of the denoiser steps (and T5 encodings) of "
        "workflows that name none (a workflow's ``parallel``): off; auto, the negative guidance "
        "branch (prompt) on an idle device holding the model while that is faster; always, "
        "whenever one is idle. Split guidance "
        "rounds differently from batched guidance (within 1/255 per pixel), so off is the "
        "default: the same seed gives the same bits",
    )
    parallel_parts: list[StepPart] = Field(
        ["cfg", "controlnet"], description="what of a step parallelism may run on another "
        "device, a step running apart the first of these it can: cfg, its negative guidance "
        "branch; controlnet, its ControlNet, whose outputs the model takes once its first "
        "blocks ran (the same bits as run here)",
    )
    parallel_busy_max: float = Field(
        0.5, ge=0, le=1, description="an idle host offers to run parts of any other "
        "device's steps only while busy at most this share of the last parallel_window_s (on "
        "a loaded cluster an idle moment is soon taken by a new arrival); beyond it, only of "
        "steps whose deadline the split decides",
    )
    parallel_urgent_busy_max: float = Field(
        0.8, ge=0, le=1, description="a host busy more than this share of the last "
        "parallel_window_s helps no step, not even one whose deadline the split decides: "
        "near capacity every idle moment is soon needed by a new arrival, and a split step "
        "costs more device time than a whole one",
    )
    parallel_window_s: float = Field(
        20.0, gt=0, description="the window over which a host's busy share is measured "
        "(long enough that a loaded device's idle moments do not read as a light load)")
    drop_doomed: bool = Field(
        True, description="drop a task whose request can no longer meet its deadline (its "
        "remaining work at the fastest measured step times exceeds the time left), not only "
        "one already past it",
    )
    figure_max_age_s: float = Field(
        5.0, gt=0, description="a replica's step figures slower than its fastest (one "
        "task's smoothed step time, which judges what can still make its deadline; its recent "
        "tasks' mean and 90th percentile, which admission holds against deadlines) count only "
        "while it has measured a step (a whole one, not beside a model load) within this "
        "many seconds; after that its fastest figures stand in until it runs again. Figures "
        "measured under a burst's contention would otherwise keep turning away, for good, the "
        "work that would measure them again",
    )
    device_hosts: bool = Field(
        False, description="one device host per device, serving every pool resident there: "
        "with the local or Kubernetes backend `lego host` processes (`lego up` starts one per "
        "device of ``devices``) whose pools the autoscaler writes to KV lego-residency; a "
        "backend that hosts replicas in its own process runs the hosts there (else one host "
        "per replica)",
    )

    # --- autoscaler --------------------------------------------------------------------------
    autoscale: bool = Field(True, description="`lego up` runs the autoscaler (else 1 replica/pool)")
    monolithic: bool = Field(
        False, description="serve each workflow as one monolithic node type (the baseline)"
    )
    min_replicas: int = Field(1, ge=0, description="per pool; 0 allows scale to zero")
    max_replicas: int = Field(8, ge=1, description="per pool")
    replicas: dict[str, int] = Field(
        default_factory=dict,
        description="per node kind (or pool name) minimum, e.g. {denoiser: 2}; overrides min",
    )
    slots: int | None = Field(
        None, ge=1,
        description="replica slots shared by all pools; None: one per pool + one per CPU core",
    )
    devices: list[str] = Field(
        default_factory=list,
        description="devices to place replicas on, e.g. [cuda:0, cuda:1]; empty: this CPU host",
    )
    device_memory_bytes: int | None = Field(None, gt=0, description="per device; None: probe")
    cpu_hosts: int | None = Field(
        None, ge=1, description="device hosts on a machine without ``devices``: this many CPU "
        "hosts (None: one per core)",
    )
    node_template: bool = Field(
        True, description="the local backend forks node processes from a template process "
        "that did their imports once (else each starts from scratch)",
    )
    autoscale_tick_s: float = Field(0.25, gt=0, le=1)
    scale_down_delay_s: float = Field(30.0, ge=0, description="stable window before shrinking")
    keep_idle_replicas: bool = Field(
        False, description="shrink a pool only when another needs the room (a fixed cluster)"
    )
    #: the device this process runs on, as the autoscaler placed it (reported by replicas)
    device_label: str | None = None
    assignment: dict[str, list[str]] = Field(
        default_factory=dict,
        description="fixed placement, pool -> device per replica; set: no autoscaling policy "
        "(the static baselines)",
    )
    initial_replicas: dict[str, int] = Field(
        default_factory=dict,
        description="pool -> replicas the autoscaler starts with (then its policy rules, down "
        "to each pool's minimum)",
    )
    exclusive_kinds: list[str] = Field(
        default_factory=exclusive_kinds,
        description="on GPUs a replica of these kinds takes a whole device (by default the "
        "big ones: a denoiser, a whole workflow)",
    )
    one_per_device_kinds: list[str] = Field(
        default_factory=list,
        description="on GPUs, at most one replica of these kinds per device; smaller models "
        "may share it (instead of exclusive_kinds)",
    )

    # --- plug-ins (optional machinery registered through seams; see services.schemes) ---------
    plugins: list[str] = Field(
        default_factory=list,
        description="modules `lego` imports at start-up, before anything else; each registers "
        "its model scheme, backend or workflow source (env: LEGO_PLUGINS='[\"module\"]')",
    )
    workload: str | None = Field(
        None, description="serve the workflows a plug-in registered under this name instead of "
        "the shipped ones",
    )
    profile_dir: Path | None = Field(
        None, description="per-model timings a plug-in's cores read (None: its default)"
    )
    time_scale: float = Field(1.0, gt=0, description="a plug-in's clock runs this many times "
                              "faster")
    swap: bool = Field(
        False, description="replicas load lazily and are swapped LRU on their device (baseline)"
    )

    # --- admission ---------------------------------------------------------------------------
    slo_factor: float = Field(
        2.0, gt=0, description="default deadline = slo_factor x the workflow's solo latency"
    )
    slo_min_s: float = Field(
        1.0, ge=0, description="floor of default deadlines (CPU scheduling noise is ~0.1 s)"
    )
    max_deadline_s: float = Field(3600.0, gt=0, description="largest deadline_s a request may ask")
    admission: bool = Field(True, description="reject requests that cannot meet their deadline")
    admission_sample_s: float = Field(
        0.5, gt=0, le=5, description="how often admission control samples the queues"
    )
    admission_miss_target: float = Field(
        0.08, gt=0, le=1, description="share of admitted requests allowed to miss their "
        "deadline: while the pools drop more tasks as late, admission widens its margin (1: "
        "never; admission then holds its estimate alone against the deadline)",
    )

    # --- ingress: which admission rule, where replies may go ----------------------------------
    admission_rule: Literal["lego", "paper"] = Field(
        "lego", description="lego: the finish bound over the workflow's DAG (gateway/admission"
        ".py); paper: the DiFlow artifact's early abort, max(queued work / devices, longest "
        "piece) against the request's slack, skipped while fewer requests than devices are in "
        "flight",
    )
    reply_prefixes: list[str] = Field(
        default_factory=lambda: ["_INBOX_client"],
        description="subject prefixes a Lego-Reply-To header may name, besides _INBOX and "
        "nats_inbox_prefix (the ingress replies with the service account's rights, so nothing "
        "else: never $-subjects, lego.* or wildcards); the default is the client inbox of "
        "deploy/nats-accounts.conf",
    )

    # --- gateway -----------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="bearer tokens the gateway accepts on /v1/*, {name: token} or a list of "
        "tokens (named key-1, key-2, ...); empty: no authentication",
    )
    api_key_scopes: dict[str, list[str]] = Field(
        default_factory=dict,
        description="scopes of the api_keys by key name, e.g. {ops: [admin]}: `admin` may "
        "register, replace and delete workflows; a key not named here has none (it may use "
        "the rest of the API); api_keys may also give them: {ops: {token: ..., scopes: "
        "[admin]}}",
    )
    api_key: str | None = Field(
        None, description="the key `lego` commands send to a gateway (default: the first of "
        "api_keys)",
    )
    rate_limit_rps: float = Field(
        0.0, ge=0, description="requests per second per API key (token bucket); 0: no limit"
    )
    rate_limit_burst: int = Field(20, ge=1, description="requests an idle API key may burst")

    # --- webhooks (common/webhooks.py; the gateways deliver them) -----------------------------
    webhook_allow: list[str] = Field(
        default_factory=list,
        description="hosts a request's webhook_url may name: a host or host:port, where * "
        "stands for any characters (hooks.example.com, *.example.com, 127.0.0.1:8080, "
        "localhost:*, [::1]:*); empty: webhooks are off; ['*']: any host",
    )
    webhook_secret: SecretStr | None = Field(
        None, description="the key every webhook is signed with (HMAC-SHA256, Standard "
        "Webhooks): whsec_<base64 key> or any other string (its UTF-8 bytes are the key); "
        "required with webhook_allow",
    )
    webhook_timeout_s: float = Field(
        5.0, gt=0, le=60, description="how long one delivery waits for the receiver's answer"
    )
    webhook_max_attempts: int = Field(
        8, ge=1, le=100, description="deliveries of one event before it is given up (and "
        "noted in the request's state)",
    )
    webhook_backoff_s: float = Field(
        1.0, ge=0, description="wait before the second attempt; doubled for each next one"
    )
    webhook_backoff_max_s: float = Field(300.0, ge=0, description="longest wait between attempts")
    webhook_resolve_timeout_s: float = Field(
        2.0, gt=0, description="how long a submission waits for its webhook host's address "
        "(a name that does not exist is rejected; one still unknown then is accepted)",
    )
    webhook_concurrency: int = Field(
        16, ge=1, description="deliveries in flight at once, per gateway replica"
    )

    @model_validator(mode="after")
    def _webhooks_are_signed(self) -> Settings:
        if self.webhook_allow and not (
            self.webhook_secret and self.webhook_secret.get_secret_value()
        ):
            raise ValueError("webhook_allow is set but webhook_secret is not: every webhook "
                             "is signed, set LEGO_WEBHOOK_SECRET")
        return self

    @field_validator("nats_url", mode="before")
    @classmethod
    def _join_nats_servers(cls, value: object) -> object:
        if isinstance(value, list | tuple):  # a config file's list of cluster servers
            return ",".join(str(server).strip() for server in value)
        return value

    @property
    def nats_servers(self) -> list[str]:
        """The NATS servers of ``nats_url``, in order (several: a NATS cluster)."""
        return [s.strip() for s in (self.nats_url or "").split(",") if s.strip()]

    @model_validator(mode="before")
    @classmethod
    def _split_key_scopes(cls, data: object) -> object:
        """``api_keys: {name: {token: T, scopes: [...]}}`` is ``api_keys: {name: T}`` plus
        ``api_key_scopes: {name: [...]}``."""
        if not isinstance(data, dict):
            return data
        keys = data.get("api_keys")
        if not isinstance(keys, dict) or not any(isinstance(v, dict) for v in keys.values()):
            return data
        scopes = dict(data.get("api_key_scopes") or {})
        tokens = {}
        for name, value in keys.items():
            if isinstance(value, dict):
                if "token" not in value:
                    raise ValueError(f"api_keys.{name}: a mapping needs a token")
                tokens[name] = value["token"]
                scopes[name] = list(value.get("scopes") or [])
            else:
                tokens[name] = value
        return {**data, "api_keys": tokens, "api_key_scopes": scopes}

    @model_validator(mode="after")
    def _known_scopes(self) -> Settings:
        for name, scopes in self.api_key_scopes.items():
            if name not in self.api_keys:
                raise ValueError(f"api_key_scopes: {name!r} is none of the api_keys")
            unknown = set(scopes) - set(API_KEY_SCOPES)
            if unknown:
                raise ValueError(f"api_key_scopes.{name}: unknown scopes {sorted(unknown)}; "
                                 f"known: {list(API_KEY_SCOPES)}")
        return self

    @property
    def model_root_dirs(self) -> list[Path]:
        """Where a registered workflow's model directories may be (``model_roots``)."""
        return list(self.model_roots) or [self.cache_dir / "models"]

    @property
    def named_models(self) -> dict[str, str]:
        """The models a registered workflow may name: ``models``, ``base``, ``upscaler``."""
        return {"base": self.base_model, "upscaler": self.upscaler_model, **self.models}

    @field_validator("api_keys", mode="before")
    @classmethod
    def _name_api_keys(cls, value: object) -> object:
        if isinstance(value, list | tuple):  # a bare list of tokens: name them by position
            return {f"key-{i}": token for i, token in enumerate(value, start=1)}
        return value

    # --- observability -----------------------------------------------------------------------
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector for traces, e.g. http://localhost:4318; tracing is off "
        "unless this or trace_dir is set",
    )
    trace_dir: Path | None = Field(
        None, description="also write finished spans as JSON lines, one file per process"
    )
    node_metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="Prometheus port of every node replica; 0: a free one, reported in its "
        "status; None: none",
    )
    autoscaler_metrics_port: int | None = Field(
        9464, ge=0, le=65535, description="Prometheus port of the autoscaler; None: none"
    )

    # --- stack -------------------------------------------------------------------------------
    run_dir: Path = Field(
        default_factory=lambda: default_cache_dir() / "run",
        description="where a running `lego up` leaves its address for other lego commands",
    )
    liveness_timeout_s: float = Field(
        60.0, ge=0, description="a node process whose step or event loop makes no progress "
        "for this long ends itself (exit 70) so that its supervisor replaces it; 0: never",
    )
    stop_timeout_s: float = Field(
        15.0, gt=0, description="how long `lego up` may take to stop: its processes drain "
        "while NATS is up, then what remains is killed, and nats-server stopped last",
    )
    parent_pid: int | None = Field(
        None, description="set by the lego process that started this one (common.lifetime): "
        "when that parent is gone, this process stops too",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def min_replicas_of(self, pool: str, kind: str) -> int:
        """A pool's minimum: ``replicas[pool]``, else ``replicas[kind]``, else min_replicas."""
        return self.replicas.get(pool, self.replicas.get(kind, self.min_replicas))

    @property
    def store_kind(self) -> Literal["shm", "redis"]:
        return "redis" if self.redis_url else "shm"

    def child_env(self) -> dict[str, str]:
        """Environment that hands these settings to a child process."""
        env = dict(os.environ)
        for name, value in self.model_dump(mode="json").items():
            secret = getattr(self, name)
            if isinstance(secret, SecretStr):  # dumped as "**********"
                value = secret.get_secret_value()
            if value is None:
                env.pop(f"LEGO_{name.upper()}", None)
                continue
            # pydantic-settings reads complex values (lists, dicts) from the environment as JSON
            env[f"LEGO_{name.upper()}"] = (
                json.dumps(value) if isinstance(value, list | dict) else str(value)
            )
        env.pop("NATS_URL", None)
        env.pop("REDIS_URL", None)
        return env


def load_settings(config_file: Path | str | None = None, **overrides: object) -> Settings:
    """Settings from (lowest first) defaults, a config file, the environment, then overrides.

    The config file is YAML or JSON with the field names of ``Settings``; ``LEGO_CONFIG`` names
    one when ``config_file`` is not given.
    """
    import yaml

    from_env = Settings()
    path = config_file or os.environ.get("LEGO_CONFIG")
    values: dict[str, object] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path}: expected a mapping of setting names")
        values.update(loaded)
    values.update({name: getattr(from_env, name) for name in from_env.model_fields_set})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings.model_validate(values)
