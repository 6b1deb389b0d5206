"""NATS connection and the JetStream topology (streams, consumers, buckets), created idempotently
by whichever process starts first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
import threading
import traceback
import weakref
from typing import Any

from nats import errors as nats_errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import errors as js_errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

from common import heap, subjects
from common.errors import ConfigError
from common.settings import Settings

log = logging.getLogger(__name__)

MAX_PAYLOAD = 1024 * 1024  # NATS' default; tensors never travel in messages
#: how long the work streams remember a Nats-Msg-Id: a re-published message is dropped
DUPLICATE_WINDOW_S = 120.0

_clients: weakref.WeakSet[NATS] = weakref.WeakSet()  # every client ``connect`` made

#: what a JetStream write or read answers while its stream has no leader (a NATS cluster lost
#: the server that led it and elects another, within seconds), or while this client moves to
#: another server: it is tried again. No responders and 503 mean nothing was stored; after a
#: timeout it may have been (a retried publish with a Nats-Msg-Id is de-duplicated; the
#: compare-and-set writes of ``common.tracking`` recognise their own earlier write).
FAILOVER_ERRORS = (
    nats_errors.NoRespondersError, js_errors.NoStreamResponseError,
    js_errors.ServiceUnavailableError, nats_errors.TimeoutError,
    nats_errors.ConnectionReconnectingError, nats_errors.StaleConnectionError,
)


class FailoverJetStream(JetStreamContext):
    """A JetStream context whose publishes and message reads (so every key-value write and
    read: its buckets call these) are tried again, backing off, for up to ``failover_s``
    while the stream elects a new leader, instead of failing the work at hand."""

    def __init__(self, conn: NATS, failover_s: float, **opts: Any) -> None:
        super().__init__(conn, **opts)
        self.failover_s = failover_s

    async def _failover(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        deadline = asyncio.get_running_loop().time() + self.failover_s
        delay = 0.05
        while True:
            try:
                return await call(*args, **kwargs)
            except FAILOVER_ERRORS as exc:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0 or self._nc.is_closed:
                    raise
                log.info("%s %s: %s; trying again", what, args[0] if args else "",
                         type(exc).__name__)
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        return await self._failover("publish", super().publish, *args, **kwargs)

    async def get_msg(self, *args: Any, **kwargs: Any) -> Any:
        return await self._failover("read", super().get_msg, *args, **kwargs)


class Client(NATS):
    """A NATS client whose JetStream contexts ride out a cluster's leader elections."""

    failover_s = 15.0

    def jetstream(self, **opts: Any) -> JetStreamContext:
        return FailoverJetStream(self, self.failover_s, **opts)


def run_async(main: Any) -> Any:
    """Run a process's main coroutine, on uvloop where it is installed (faster NATS I/O),
    with what the process loaded so far out of the garbage collector's walks (``heap``).
    SIGUSR1 logs where each of its tasks waits (``kill -USR1 PID``: a process that seems stuck
    tells why)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_dumping_tasks(main))
    return uvloop.run(_dumping_tasks(main))


async def _dumping_tasks(main: Any) -> Any:
    dump_tasks_on_signal()
    heap.freeze(collect=True)  # what the process imported stays: no collection walks it
    return await main


def dump_tasks_on_signal() -> None:
    """From now on SIGUSR1 runs ``log_tasks`` in the running loop (where one can be set)."""
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, log_tasks)


def log_tasks() -> None:
    """Log every task of the running loop with the chain of awaits it waits in, innermost
    last (``Task.print_stack`` shows only the outermost frame of a suspended task), then
    every other thread's stack (a thread that never ends keeps the process alive)."""
    current = threading.get_ident()
    for thread in threading.enumerate():
        frame = sys._current_frames().get(thread.ident or 0)
        if thread.ident != current and frame is not None:
            log.warning("thread %s%s:\n%s", thread.name, " (daemon)" if thread.daemon else "",
                        "".join(traceback.format_stack(frame)).rstrip())
    tasks = asyncio.all_tasks()
    for i, task in enumerate(tasks, 1):
        lines: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is None:
                lines.append(f"  awaiting {awaited!r}")
                break
            lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, '
                         f"in {frame.f_code.co_name}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        log.warning("task %d of %d, %s:\n%s", i, len(tasks), task.get_name(), "\n".join(lines))


async def connect(settings: Settings, name: str) -> NATS:
    """Connect to the configured NATS (credentials and TLS from settings), reconnecting forever
    while the server is unreachable: to any server of ``nats_url`` (a cluster's, comma
    separated) or one the cluster told of; a server that refuses the credentials or the TLS
    handshake raises ``ConfigError`` at once instead (retrying would never succeed)."""
    if not settings.nats_servers:
        raise RuntimeError("no NATS server: set NATS_URL or run `lego up`")
    options: dict = {"name": name, "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5,
                     **_auth_options(settings)}
    if settings.nats_inbox_prefix:  # a least-privilege client account may read only these
        options["inbox_prefix"] = settings.nats_inbox_prefix
    nc = Client()
    nc.failover_s = settings.nats_failover_s
    _clients.add(nc)
    connecting = True

    async def on_error(exc: Exception) -> None:
        # nats-py retries a refused first connect forever; raising here ends its connect loop
        if connecting and _refused(exc):
            raise ConfigError(
                f"NATS at {settings.nats_url} refused {name}: {exc or type(exc).__name__} "
                "(check nats_user/nats_password, nats_creds_file, nats_nkey_seed_file and "
                "the nats_tls_* settings)"
            ) from exc
        log.error("nats: %s", exc or type(exc).__name__)

    try:
        await nc.connect(settings.nats_servers, error_cb=on_error, **options)
    except ConfigError:
        # after a failed TLS handshake close() can wait forever on the half-open transport
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 1.0)
        raise
    connecting = False
    return nc


def connected() -> bool:
    """Whether a NATS client of this process is connected (or draining) now; safe to call from
    any thread (``common.lifetime`` asks it whether a drain can still get anywhere)."""
    while True:
        try:
            return any(nc.is_connected for nc in list(_clients))
        except RuntimeError:  # the set changed while another thread read it
            continue


def _auth_options(settings: Settings) -> dict[str, Any]:
    """nats.connect's credential and TLS options from the settings."""
    options: dict[str, Any] = {}
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password
    if settings.nats_creds_file:
        options["user_credentials"] = str(settings.nats_creds_file)
    if settings.nats_nkey_seed_file:
        options["nkeys_seed"] = str(settings.nats_nkey_seed_file)
    if settings.nats_tls_ca_file or settings.nats_tls_cert_file:
        tls = ssl.create_default_context(
            cafile=str(settings.nats_tls_ca_file) if settings.nats_tls_ca_file else None
        )
        if settings.nats_tls_cert_file:
            tls.load_cert_chain(
                str(settings.nats_tls_cert_file),
                str(settings.nats_tls_key_file) if settings.nats_tls_key_file else None,
            )
        options["tls"] = tls
    return options


def _refused(exc: Exception) -> bool:
    """Whether the server turned this client away (credentials, TLS), not merely unreachable."""
    return isinstance(exc, nats_errors.AuthorizationError | ssl.SSLError) or (
        isinstance(exc, nats_errors.Error) and "authorization violation" in str(exc).lower()
    )


async def close(nc: NATS, timeout_s: float = 5.0) -> None:
    """Flush what is pending and close, without hanging when the server is already gone.

    Close rather than drain: drain waits on a pull subscription's leftover status messages."""
    try:
        await asyncio.wait_for(nc.flush(), timeout_s)
    except Exception as exc:  # noqa: BLE001 - the server went away first; nothing to flush to
        log.warning("could not flush before closing: %s", exc)
    try:
        await nc.close()
    except Exception as exc:  # noqa: BLE001
        log.debug("close failed: %s", exc)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)  # exists with other settings: bring it to ours


async def ensure_topology(js: JetStreamContext, settings: Settings) -> dict[str, KeyValue]:
    """Create the streams and buckets if missing; returns the buckets by name."""
    for name, subject in (
        (subjects.REQUESTS_STREAM, subjects.REQUESTS_SUBJECT),
        (subjects.TASKS_STREAM, subjects.TASKS_WILDCARD),
        (subjects.WEBHOOKS_STREAM, subjects.WEBHOOKS_WILDCARD),
    ):
        await _ensure_stream(
            js,
            StreamConfig(
                name=name,
                subjects=[subject],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                max_msg_size=MAX_PAYLOAD,
                duplicate_window=DUPLICATE_WINDOW_S,  # de-duplication of re-published work
                num_replicas=settings.stream_replicas,
            ),
        )
    await _ensure_stream(
        js,
        StreamConfig(
            name=subjects.RESULTS_STREAM,
            subjects=[subjects.RESULTS_WILDCARD],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.result_ttl_s,
            max_msgs_per_subject=1,
            num_replicas=settings.stream_replicas,
        ),
    )
    buckets = {
        subjects.STATE_BUCKET: settings.result_ttl_s,
        subjects.WORKFLOW_BUCKET: None,
        subjects.JOIN_BUCKET: settings.tensor_ttl_s,
        subjects.CANCEL_BUCKET: settings.tensor_ttl_s,
        subjects.RESIDENCY_BUCKET: None,  # what a device should hold lasts until rewritten
    }
    out = {}
    for bucket, ttl in buckets.items():
        try:
            out[bucket] = await js.key_value(bucket)
        except Exception:  # noqa: BLE001 - nats-py raises BucketNotFoundError or NotFoundError
            out[bucket] = await js.create_key_value(
                KeyValueConfig(bucket=bucket, ttl=ttl, history=1, storage=StorageType.FILE,
                               replicas=settings.stream_replicas)
            )
            continue
        # an existing bucket (made by an earlier stack at other settings) gets our replicas
        config = (await js.stream_info(f"KV_{bucket}")).config
        if config.num_replicas != settings.stream_replicas:
            config.num_replicas = settings.stream_replicas
            await js.update_stream(config)
    return out


def consumer_config(durable: str, subject: str, settings: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        filter_subject=subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=settings.max_ack_pending,
    )


async def pull_subscription(
    js: JetStreamContext, stream: str, durable: str, subject: str, settings: Settings
) -> JetStreamContext.PullSubscription:
    """Bind to the durable pull consumer shared by every replica, creating it if needed."""
    await ensure_consumer(js, stream, durable, subject, settings)
    return await js.pull_subscribe_bind(durable=durable, stream=stream)


async def ensure_consumer(
    js: JetStreamContext, stream: str, durable: str, subject: str, settings: Settings
) -> None:
    """Create the durable consumer if missing. The autoscaler does so for every pool before
    it has a replica, so that work waiting for a cold start shows up as lag."""
    config = consumer_config(durable, subject, settings)
    try:
        await js.add_consumer(stream, config)
    except BadRequestError:
        log.debug("consumer %s exists with other settings; keeping it", durable)
