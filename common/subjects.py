"""Every NATS subject, stream, consumer and key-value bucket name. No other module spells one.

    lego.requests                 stream LEGO_REQUESTS (work queue), durable consumer "ingress":
                                  generation requests from the gateway or straight from clients
    lego.tasks.<pool>             stream LEGO_TASKS (work queue), one durable pull consumer per
                                  pool: the tasks of one model node type
    lego.results.<request id>     stream LEGO_RESULTS (kept result_ttl): one completion event
    lego.progress.<request id>    core NATS: per-step progress, best effort
    lego.webhooks.<id>.<event>    stream LEGO_WEBHOOKS (work queue), durable consumer "webhooks"
                                  shared by every gateway replica: a request's events to POST
                                  to its webhook_url, kept until delivered or given up
    lego.replicas.<pool>          core NATS: every replica's status, once a second
    lego.branch.<pool>[.urgent]   core NATS, queue group "helpers": part of a denoising step
                                  (its negative guidance branch, or its ControlNet), for an
                                  idle device that holds the model (only those subscribe: to
                                  .urgent, also one busy lately; CFG and ControlNet
                                  parallelism); answered on the asking host's inbox, accepted
                                  first, then done
    lego.autoscaler.events        core NATS: the autoscaler's scale decisions (ScaleEvent)
    lego.admission.shed           core NATS: tasks each ingress turned away, per pool (ShedReport)
    KV lego-requests              request state, any gateway replica answers from it
    KV lego-workflows             registered workflow specs (added at run time)
    KV lego-joins                 rendezvous of DAG joins (a node with several inputs)
    KV lego-cancels               cancelled request ids, watched by every node
    KV lego-residency             per device host (key: ``host_key``), the pools resident on
                                  it (HostResidency): the autoscaler writes, the host follows
    _INBOX.<...>                  a client's replies (``Lego-Reply-To``; ``reply_allowed``)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from common.errors import InvalidField

REQUESTS_STREAM = "LEGO_REQUESTS"
REQUESTS_SUBJECT = "lego.requests"
INGRESS_CONSUMER = "ingress"

TASKS_STREAM = "LEGO_TASKS"
TASKS_WILDCARD = "lego.tasks.>"

RESULTS_STREAM = "LEGO_RESULTS"
RESULTS_WILDCARD = "lego.results.>"

WEBHOOKS_STREAM = "LEGO_WEBHOOKS"
WEBHOOKS_WILDCARD = "lego.webhooks.>"
WEBHOOKS_CONSUMER = "webhooks"

PROGRESS_WILDCARD = "lego.progress.>"
REPLICAS_WILDCARD = "lego.replicas.>"
AUTOSCALER_EVENTS = "lego.autoscaler.events"
ADMISSION_SHED = "lego.admission.shed"

STATE_BUCKET = "lego-requests"
WORKFLOW_BUCKET = "lego-workflows"
JOIN_BUCKET = "lego-joins"
#: every write to the state bucket is also a plain NATS message here: a gateway follows all of
#: them with one subscription instead of one KV watcher per waiting client
STATE_UPDATES = f"$KV.{STATE_BUCKET}.>"
#: the stream behind the state bucket (JetStream names a bucket's stream KV_<bucket>): the
#: history pages through it with a short-lived pull consumer
STATE_STREAM = f"KV_{STATE_BUCKET}"
CANCEL_BUCKET = "lego-cancels"
RESIDENCY_BUCKET = "lego-residency"

# JetStream publishes this when a message exhausted max_deliver without an ack (every replica
# that took a task was killed, or the ingress kept failing on a request): the ingress turns it
# into a failed request instead of a silent drop.
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.*.*"

_TOKEN = re.compile(r"[^a-z0-9-]+")


def pool_name(kind: str, model: str, digest: str | None = None) -> str:
    """Name of the replica pool serving ``kind`` for ``model`` (a model spec or path, or what a
    pool by content is named after): ``KIND-SLUG-XXXXXXXX``, the last part the first eight
    hex digits of ``digest`` (what the pool holds), else of ``model``'s SHA-1.

    Every workflow that uses the same model for the same node type lands on the same pool.
    """
    base = model.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].lower()
    digest = digest or hashlib.sha1(model.encode()).hexdigest()
    slug = _TOKEN.sub("-", base).strip("-")[:40] or "model"
    return f"{kind}-{slug}-{digest[:8]}"


def pool_kind(pool: str) -> str:
    """The node kind a pool named by ``pool_name`` serves (its name's first part)."""
    return pool.split("-", 1)[0]


_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]+")


def host_key(name: str) -> str:
    """A device host's key in ``RESIDENCY_BUCKET``: its name (a device such as ``cuda:0``, or a
    pod name) with every character a key may not hold (``:``, and ``.``, a subject separator)
    turned into ``-``: ``cuda:0`` -> ``cuda-0``."""
    key = _NOT_KEY.sub("-", name).strip("-")
    if not key:
        raise ValueError(f"no device host key can be made of {name!r}")
    return key


def task_subject(pool: str) -> str:
    return f"lego.tasks.{pool}"


def pool_consumer(pool: str) -> str:
    return f"pool-{pool}"


def result_subject(request_id: str) -> str:
    return f"lego.results.{check_request_id(request_id)}"


def progress_subject(request_id: str) -> str:
    return f"lego.progress.{check_request_id(request_id)}"


def webhook_subject(request_id: str, event: str) -> str:
    return f"lego.webhooks.{check_request_id(request_id)}.{event}"


def replica_subject(pool: str) -> str:
    return f"lego.replicas.{pool}"


#: the queue group of every pool's branch subject: one idle helper gets each step
BRANCH_QUEUE = "helpers"


def branch_subject(pool: str, urgent: bool = False) -> str:
    """Where part of a step of ``pool`` is asked for: of a helper idle and not busy lately,
    or (``urgent``: a step whose deadline the split decides) of any idle one."""
    return f"lego.branch.{pool}" + (".urgent" if urgent else "")


def task_msg_id(request_id: str, node: str, handoffs: int = 0) -> str:
    """Nats-Msg-Id of a task: a re-published task (a replica died before acking) is dropped.
    A task a busy host handed back is a new message: its hand-off count tells it apart."""
    return f"{request_id}:{node}" + (f":h{handoffs}" if handoffs else "")


#: nats-py's (and every NATS client's) default inbox prefix: a client's replies arrive under it
DEFAULT_INBOX_PREFIX = "_INBOX"
#: never a reply's subject, whatever is configured: the ingress publishes with the service
#: account's rights, so a reply there would be a client writing JetStream's API ($JS), a KV
#: bucket ($KV: cancel another's request), the system account ($SYS) or our own subjects
_RESERVED_REPLY_PREFIXES = ("$", "lego.")
_REPLY_TOKEN = re.compile(r"[^\s*>.\x00-\x1f\x7f]+")  # no wildcard, separator or space
_MAX_REPLY_CHARS = 256


def reply_allowed(subject: object, prefixes: Iterable[str]) -> bool:
    """Whether a client's ``Lego-Reply-To`` may name ``subject``: a literal subject (no
    wildcard, no empty token, no space) under one of the inbox ``prefixes`` (each a subject
    prefix like ``_INBOX``, matched token-wise), and never a reserved one."""
    if not isinstance(subject, str) or not 0 < len(subject) <= _MAX_REPLY_CHARS:
        return False
    if subject.startswith(_RESERVED_REPLY_PREFIXES):
        return False
    if not all(_REPLY_TOKEN.fullmatch(token) for token in subject.split(".")):
        return False
    return any(subject.startswith(prefix.rstrip(".") + ".") for prefix in prefixes if prefix)


#: what a request id may be: it becomes a subject token, a KV key and a store path segment, so
#: only characters that are none of NATS's separators and wildcards, no path step, no space
REQUEST_ID_RULE = "1-64 characters of A-Z a-z 0-9 _ -"
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def valid_request_id(request_id: object) -> bool:
    """Whether ``request_id`` is a string of ``REQUEST_ID_RULE``: the one check every id
    passes before it becomes a subject, a key or a path (client-chosen or generated)."""
    # fullmatch: "$" would also accept a trailing newline
    return isinstance(request_id, str) and _REQUEST_ID.fullmatch(request_id) is not None


def check_request_id(request_id: object, field: str = "id") -> str:
    """``request_id`` if valid, else ``InvalidField`` naming ``field`` and the rule."""
    if isinstance(request_id, str) and valid_request_id(request_id):
        return request_id
    raise InvalidField(field, f"must be {REQUEST_ID_RULE}", 64)
