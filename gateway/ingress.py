"""The one ingress path. Every request, POSTed to the gateway or published straight to
``lego.requests``, is validated and planned here; the ingress then records its state and
publishes the tasks of the workflow's root nodes. Nodes take it from there.

Direct NATS clients publish the request JSON (see ``common.messages``) to ``lego.requests``,
optionally with a ``Lego-Reply-To`` header naming a subject for the acceptance (or the error),
and read the outcome from ``lego.results.<id>``. Nothing in a message is trusted: its id passes
``subjects.check_request_id``, and the reply goes only to a client's inbox
(``subjects.reply_allowed``), never where the service account's rights would reach further.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from common import bus, history, metrics, subjects, telemetry, webhooks
from common.errors import (
    Conflict,
    DeadlineExceeded,
    InvalidField,
    InvalidRequest,
    LegoError,
    Overloaded,
    TerminalError,
    Unavailable,
)
from common.messages import (
    ErrorInfo,
    Plan,
    QueueMark,
    RequestState,
    Task,
    decode,
    encode,
    error_info,
    now,
)
from common.observe import unstartable
from common.registry import WorkflowRegistry
from common.settings import Settings
from common.store import TensorStore, tensor_key
from common.tracking import RequestTracker
from common.workflow import ModelInfo, ValidRequest, WorkflowSpec, validate_params
from gateway import admission
from gateway.webhooks import check_resolves

log = logging.getLogger(__name__)

REPLY_HEADER = "Lego-Reply-To"
DEFAULT_WORKFLOW = "txt2img"
#: set by the gateway, which already accepted the request (its created_at)
ACCEPTED_HEADER = "Lego-Accepted-At"
#: how long past its deadline a request may still be finishing (its last node storing the
#: image) before the ingress ends it as late
DEADLINE_GRACE_S = 1.0


def _client_id(raw: Any) -> str | None:
    """The client-chosen id of a raw request, if it has a usable one."""
    candidate = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(candidate, str) and subjects.valid_request_id(candidate):
        return candidate
    return None


def _count(workflow: str, outcome: str) -> None:
    """A submission's outcome: counted (``lego_requests_total``) and noted on its trace."""
    metrics.REQUESTS.labels(workflow, outcome).inc()
    telemetry.annotate({"lego.workflow": workflow, "lego.outcome": outcome})


def request_digest(workflow: str, params: dict[str, Any]) -> str:
    """Identifies a submission's content, so a retried POST with the same id is idempotent."""
    body = orjson.dumps({"workflow": workflow, **params}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(body).hexdigest()[:32]


@dataclass(frozen=True)
class Admission:
    """What admission decided for a new request: its deadline and when it should finish
    (seconds from now; None when unknown), and where it enters its first pools' queues."""

    deadline_s: float | None
    eta_s: float | None = None
    queue: dict[str, QueueMark] = field(default_factory=dict)
    #: what the ledger books for it once accepted: its plan and each node's steps
    plan: Plan | None = None
    steps: dict[str, int] = field(default_factory=dict)


class Ingress:
    def __init__(
        self,
        settings: Settings,
        js: JetStreamContext,
        registry: WorkflowRegistry,
        tracker: RequestTracker,
        store: TensorStore,
        models: ModelInfo | None,
        loads: admission.LoadWatch | None = None,
    ) -> None:
        """``loads``: the pools' queues and measured task times, for deadlines and admission
        control (None: requests get a deadline only if they ask for one or the workflow
        declares its solo latency, and nothing is rejected for load)."""
        self.settings = settings
        self.js = js
        self.registry = registry
        self.tracker = tracker
        self.store = store
        self.models = models
        self.loads = loads
        self.deadline_policy = admission.DeadlinePolicy(
            settings.slo_factor, settings.slo_min_s, settings.max_deadline_s
        )
        #: where a client's Lego-Reply-To may point: the clients' inboxes, nothing else
        self.reply_prefixes = [subjects.DEFAULT_INBOX_PREFIX, *settings.reply_prefixes]
        if settings.nats_inbox_prefix:
            self.reply_prefixes.append(settings.nats_inbox_prefix)
        # (deadline_at, request id) of the requests this replica planned, soonest first
        self._deadlines: list[tuple[float, float, str]] = []  # (due at, deadline at, id)
        self._deadline_added = asyncio.Event()

    # --- shared by the gateway and the consumer -------------------------------------------------

    def _known(self, workflow: Any) -> str:
        """``workflow`` as a metric label: a registered name, else "unknown" (clients choose
        it, so it must not mint label values)."""
        known = isinstance(workflow, str) and workflow in self.registry.all()
        return workflow if known else "unknown"

    def parse(self, raw: Any) -> tuple[str, WorkflowSpec, ValidRequest]:
        """Validate a raw request (the same code for HTTP and NATS). Returns (id, spec, valid)."""
        try:
            return self._parse(raw)
        except LegoError:
            workflow = raw.get("workflow", DEFAULT_WORKFLOW) if isinstance(raw, dict) else None
            _count(self._known(workflow), "invalid")
            raise

    def _parse(self, raw: Any) -> tuple[str, WorkflowSpec, ValidRequest]:
        if not isinstance(raw, dict):
            raise InvalidRequest([InvalidField("body", "must be a JSON object")])
        request_id = raw.get("id")
        try:  # a generated id passes the same check: it becomes a subject and keys alike
            request_id = subjects.check_request_id(
                uuid.uuid4().hex if request_id is None else request_id
            )
        except InvalidField as exc:
            raise InvalidRequest([exc]) from None
        workflow = raw.get("workflow", DEFAULT_WORKFLOW)
        if not isinstance(workflow, str):
            raise InvalidRequest([InvalidField("workflow", "must be a string")])
        spec = self.registry.get(workflow)
        hook_errors = webhooks.field_errors(raw, self.settings.webhook_allow)
        try:
            valid = validate_params(spec, raw, self.models)
        except InvalidRequest as exc:  # every bad field at once, the webhook's too
            raise InvalidRequest([*exc.errors, *hook_errors]) from None
        if hook_errors:
            raise InvalidRequest(hook_errors)
        valid.webhook = webhooks.of(raw)
        return request_id, spec, valid

    def pinned(self, raw: dict[str, Any], spec: WorkflowSpec, valid: ValidRequest,
               deadline_s: float | None) -> dict:
        """``raw`` with the values validation chose (random seeds, defaults, the deadline)
        written in, so validating it again anywhere gives the same request."""
        chosen = {k: v for k, v in valid.params.items() if spec.params[k].type != "image"}
        pinned = {**raw, **chosen}
        if deadline_s is not None:
            pinned["deadline_s"] = deadline_s
        return pinned

    def plan(self, spec: WorkflowSpec) -> Plan:
        return spec.compile(monolithic=self.settings.monolithic, parallel=self.settings.parallel)

    def estimated(self, plan: Plan, spec: WorkflowSpec, params: dict[str, Any]) -> Plan:
        """``plan`` with each node's estimated compute (its steps at the least step time its
        pool has shown), so that device hosts can tell how much work is left after a node."""
        loads = self.loads.loads if self.loads is not None else {}
        steps = admission.steps_of(spec, params, plan)
        for name, node in plan.nodes.items():
            load = loads.get(node.pool)
            if load is not None and load.step_s:
                node.est_s = round(steps.get(name, 1) * load.step_s, 6)
        return plan

    def admit(self, raw: dict[str, Any], spec: WorkflowSpec, valid: ValidRequest) -> Admission:
        """The request's deadline and when it should finish, after admission control: raises
        ``Overloaded`` when the work queued ahead cannot let it finish in time."""
        plan = self.plan(spec)
        self.check_startable(spec, plan)
        steps = admission.steps_of(spec, valid.params, plan)
        watch = self.loads
        loads = watch.loads if watch is not None else {}
        measured = admission.solo_latency_s(plan, loads, steps)
        deadline = admission.deadline_s(raw, spec.solo_latency_s, measured, self.deadline_policy)
        if watch is None:
            return Admission(deadline)
        rule, shared = self.settings.admission_rule, self.settings.device_hosts
        at = now()
        # with device hosts, the share of other models' work due before this deadline
        shares = (watch.ledger.due_shares(at + deadline, at)
                  if shared and deadline is not None else {})
        if deadline is not None and self.settings.admission:
            try:
                eta = admission.check(spec.name, plan, loads, deadline, steps, rule, shared,
                                      watch.margin.factor, shares.get)
            except Overloaded:
                if measured is None or measured <= deadline:  # the queues, not the deadline
                    watch.rejected(plan)
                _count(spec.name, "overloaded")
                raise
        else:
            eta = admission.estimate_s(plan, loads, steps, rule, shared, shares.get)
        queue = admission.queue_marks(plan, loads)
        watch.admitted(plan, steps)
        return Admission(deadline, eta, queue, plan, steps)

    def check_startable(self, spec: WorkflowSpec, plan: Plan) -> None:
        """``Unavailable`` (503, retry when the pool tries again) if a pool of ``plan`` cannot
        start: its replicas report that its model fails to load and none serves
        (``observe.unstartable``). The request would only wait for its deadline."""
        if self.loads is None:
            return
        failing = unstartable(self.loads.observer.live_statuses())
        for node in plan.nodes.values():
            status = failing.get(node.pool)
            if status is None:
                continue
            _count(spec.name, "unavailable")
            retry_s = max(1.0, status.retry_in_s or 0.0)
            raise Unavailable(
                f"{spec.name}: its pool {node.pool} cannot start: {status.error} ("
                f"{status.failures} attempts failed; the next in {retry_s:.0f} s)",
                retry_after_s=retry_s, pool=node.pool, pool_error=status.error,
                failures=status.failures,
            )

    async def admit_new(self, request_id: str, raw: dict[str, Any], spec: WorkflowSpec,
                        valid: ValidRequest) -> Admission:
        """``admit`` for a submission, except a retry of one accepted before under the same
        client id: that one keeps its recorded deadline and is never turned away. A new one's
        webhook host must resolve."""
        if _client_id(raw) is not None and await self.tracker.get(request_id) is not None:
            return Admission(None)
        if valid.webhook is not None:
            try:
                await check_resolves(valid.webhook.url, self.settings.webhook_resolve_timeout_s)
            except LegoError:
                _count(spec.name, "invalid")
                raise
        return self.admit(raw, spec, valid)

    async def accept(self, request_id: str, spec: WorkflowSpec, valid: ValidRequest,
                     digest: str, admitted: Admission) -> tuple[RequestState, bool]:
        """Record a new request as queued. Returns (state, created); re-submitting the same
        content under the same id returns the existing state, other content is a conflict."""
        at = now()
        state = RequestState(
            id=request_id,
            workflow=spec.name,
            status="queued",
            created_at=at,
            updated_at=at,
            params=valid.params,
            warnings=valid.warnings,
            meta={"digest": digest},
            deadline_at=None if admitted.deadline_s is None else at + admitted.deadline_s,
            eta_at=None if admitted.eta_s is None else round(at + admitted.eta_s, 3),
            queue=admitted.queue,
            webhook=valid.webhook,
        )
        if await self.tracker.create(state):
            _count(spec.name, "accepted")
            if self.loads is not None and admitted.plan is not None and state.deadline_at:
                self.loads.ledger.book(request_id, state.deadline_at, admitted.plan,
                                       admitted.steps, self.loads.loads, at)
            return state, True
        existing = await self.tracker.get(request_id)
        if existing is None:  # expired between the two calls
            return await self.accept(request_id, spec, valid, digest, admitted)
        if existing.meta.get("digest") != digest:
            _count(spec.name, "conflict")
            raise Conflict(
                f"id: {request_id!r} is already used by another request", field="id"
            )
        _count(spec.name, "duplicate")
        return existing, False

    # --- the consumer ----------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Consume ``lego.requests`` (shared by every ingress replica) until ``stop``."""
        sub = await bus.pull_subscription(
            self.js, subjects.REQUESTS_STREAM, subjects.INGRESS_CONSUMER,
            subjects.REQUESTS_SUBJECT, self.settings,
        )
        advisories = await self.js._nc.subscribe(
            subjects.MAX_DELIVERIES_ADVISORY, queue="ingress", cb=self._on_max_deliveries
        )
        # every state change reaches one ingress replica: each request's end is counted once
        endings = await self.js._nc.subscribe(
            subjects.STATE_UPDATES, queue="ingress", cb=self._on_state
        )
        background = [asyncio.create_task(loop()) for loop in
                      (self._sweep_loop, self._deadline_loop, self._late_sweep_loop)]
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                # returns on the first arrival; a stop does not wait for the fetch to expire
                fetching = asyncio.ensure_future(sub.fetch(1, timeout=0.5))
                await asyncio.wait({fetching, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not fetching.done():
                    fetching.cancel()  # a request it would have taken is delivered again
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await fetching
                    break
                try:
                    [msg] = fetching.result()
                except TimeoutError:
                    continue
                except Exception as exc:  # noqa: BLE001 - NATS is down: wait for it, never stop
                    log.warning("ingress: could not fetch a request (%s); retrying", exc)
                    await asyncio.sleep(max(self.settings.retry_backoff_s, 0.1))
                    continue
                await self.handle(msg, stop)
        finally:
            stopping.cancel()
            for task in background:
                task.cancel()
            await advisories.unsubscribe()
            await endings.unsubscribe()
            await sub.unsubscribe()

    async def plan_accepted(self, request_id: str, spec: WorkflowSpec, valid: ValidRequest,
                            submitted_at: float, deadline_at: float | None) -> None:
        """Plan a request this process has just accepted (and recorded as queued) and publish
        its root tasks: what a gateway that runs the ingress does itself, instead of a round
        trip through ``lego.requests``. Re-planning it (a client's retry) is harmless: the
        root tasks keep their ``Nats-Msg-Id``. A span of the request's trace, as ``handle``."""
        with telemetry.span("ingress"):
            await self._plan(request_id, spec, valid, submitted_at, deadline_at)

    async def handle(self, msg: Msg, stop: asyncio.Event | None = None) -> None:
        """Accept (or reject) and plan one request of ``lego.requests``: a span of the request's
        trace, the child of the gateway's when the gateway sent it. While NATS cannot take the
        request's writes (a stream electing its leader, a server restarting) it is tried again
        here, holding the message with in-progress acks, so an outage never spends its
        deliveries and fails it; on ``stop`` the message is left to be delivered again."""
        delay = max(self.settings.retry_backoff_s, 0.1)
        while True:
            try:
                with telemetry.span("ingress", headers=msg.headers,
                                    kind=telemetry.SpanKind.CONSUMER):
                    await self._handle(msg)
                return
            except bus.FAILOVER_ERRORS as exc:
                log.warning("ingress: NATS could not take a request's writes (%s); trying "
                            "again in %.1fs", type(exc).__name__, delay)
            with contextlib.suppress(Exception):
                await msg.in_progress()
            if stop is not None and stop.is_set():
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.ack_wait_s / 2)

    async def _on_state(self, msg: Msg) -> None:
        if msg.data:  # empty: a deletion
            state = decode(msg.data, RequestState)
            if state.done and state.updated_at == state.finished_at:  # the write that ended it
                metrics.REQUESTS_FINISHED.labels(self._known(state.workflow), state.status).inc()

    def _reply_to(self, headers: dict[str, str]) -> str | None:
        """The header's reply subject if it is a client's inbox. The reply is published with
        the service account's rights: anywhere else (``$KV.lego-cancels.<id>``, the JetStream
        API, a pool's tasks) it would let a client do what its own account may not."""
        reply_to = headers.get(REPLY_HEADER)
        if not reply_to or subjects.reply_allowed(reply_to, self.reply_prefixes):
            return reply_to or None
        log.warning("ignored %s %r: replies go only to subjects under %s; the request goes on "
                    "(its outcome is on its results subject)", REPLY_HEADER, reply_to[:200],
                    ", ".join(self.reply_prefixes))
        return None

    async def _handle(self, msg: Msg) -> None:
        headers = msg.headers or {}
        reply_to = self._reply_to(headers)
        error: InvalidRequest | None
        try:
            raw = orjson.loads(msg.data)
        except orjson.JSONDecodeError as exc:
            raw, error = None, InvalidRequest([InvalidField("body", f"not valid JSON: {exc}")])
        else:
            error = None
        request_id = _client_id(raw)
        try:
            if error is not None:
                raise error
            request_id, spec, valid = self.parse(raw)
            accepted_at = headers.get(ACCEPTED_HEADER)
            if accepted_at is not None:
                # The gateway validated and admitted the same pinned content and recorded it as
                # queued just before publishing; re-planning after a redelivery is harmless
                # (Nats-Msg-Id).
                at = float(accepted_at)
                deadline = raw.get("deadline_s")
                await self._plan(request_id, spec, valid, at,
                                 None if deadline is None else at + float(deadline))
                await msg.ack()
                return
            digest = request_digest(spec.name, {k: v for k, v in raw.items() if k != "id"})
            admitted = await self.admit_new(request_id, raw, spec, valid)
            state, created = await self.accept(request_id, spec, valid, digest, admitted)
            if not created:
                # Planned before (a redelivery): keep the values chosen then, e.g. the seed.
                valid.params.update(
                    {k: v for k, v in state.params.items() if spec.params[k].type != "image"}
                )
            if state.status == "queued":
                await self._plan(request_id, spec, valid, state.created_at, state.deadline_at)
            reply = state
        except LegoError as exc:
            reply = await self._reject(request_id, raw, exc)
        except bus.FAILOVER_ERRORS:
            raise  # NATS, not the request: handle() tries again
        except Exception:
            # Our fault, not the request's: let JetStream redeliver it.
            log.exception("ingress failed on a request; will retry")
            await msg.nak(delay=self.settings.retry_backoff_s)
            return
        if reply_to:
            await self.js._nc.publish(reply_to, encode(reply))
        await msg.ack()

    async def _reject(self, request_id: str | None, raw: Any, exc: LegoError) -> RequestState:
        at = now()
        workflow = raw.get("workflow", "") if isinstance(raw, dict) else ""
        state = RequestState(
            id=request_id or "", workflow=str(workflow), status="failed", created_at=at,
            updated_at=at, finished_at=at, error=error_info(exc),
        )
        if isinstance(exc, Overloaded | Unavailable):
            # Not recorded: the client may retry under the same id once the queues drain (or
            # the pool starts).
            if request_id:
                await self.tracker.publish_result(state, attempt=f"overloaded-{at!r}")
        elif request_id and not isinstance(exc, Conflict):
            if await self.tracker.create(state):
                await self.tracker.publish_result(state)
        return state

    async def _plan(
        self, request_id: str, spec: WorkflowSpec, valid: ValidRequest, submitted_at: float,
        deadline_at: float | None,
    ) -> None:
        if deadline_at is not None and now() > deadline_at:
            # It waited in lego.requests past its deadline (the ingress was down or behind).
            error = DeadlineExceeded(
                f"the deadline passed {now() - deadline_at:.3f}s before the request was "
                "planned; dropped, not run"
            )
            await self.tracker.finish(request_id, "failed", error=error_info(error))
            return
        telemetry.annotate({"lego.request_id": request_id, "lego.workflow": spec.name})
        plan = self.estimated(self.plan(spec), spec, valid.params)
        hook = valid.webhook
        progress_webhook = hook.url if hook is not None and "progress" in hook.events else None
        request_tensors = {
            name: await self.store.put(
                tensor_key("tmp", request_id, "request", name),
                image[None],
                self.settings.tensor_ttl_s,
            )
            for name, image in valid.images.items()
        }
        for root in plan.roots():
            node = plan.nodes[root]
            task = Task(
                request_id=request_id,
                workflow=spec.name,
                node=root,
                plan=plan,
                params=valid.params,
                inputs={
                    name: request_tensors[source.name]
                    for name, source in node.sources().items()
                },
                request_tensors=request_tensors,
                submitted_at=submitted_at,
                published_at=now(),
                meta={"warnings": valid.warnings} if valid.warnings else {},
                deadline_at=deadline_at,
                progress_webhook=progress_webhook,
            )
            await self.js.publish(
                subjects.task_subject(node.pool),
                encode(task),
                headers=telemetry.inject({"Nats-Msg-Id": subjects.task_msg_id(request_id, root)}),
            )
        if deadline_at is not None:
            self._watch_deadline(deadline_at + DEADLINE_GRACE_S, deadline_at, request_id)

    def _watch_deadline(self, due_at: float, deadline_at: float, request_id: str) -> None:
        heapq.heappush(self._deadlines, (due_at, deadline_at, request_id))
        self._deadline_added.set()

    async def _deadline_loop(self) -> None:
        """End every request this replica planned by its deadline (plus a grace), whatever its
        work is doing: a client learns it was too late then, not whenever a replica of a pool
        that has none (scaled to zero, all crashed) gets round to dropping the task. The queued
        tasks stay; the nodes drop them unrun when they fetch them. An end that fails (NATS or
        the store is down) is tried again, backing off, until it succeeds."""
        while True:
            if not self._deadlines:
                self._deadline_added.clear()
                await self._deadline_added.wait()
                continue
            due = self._deadlines[0][0] - now()
            if due > 0:
                self._deadline_added.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._deadline_added.wait(), due)
                continue
            _, deadline_at, request_id = heapq.heappop(self._deadlines)
            try:
                await self._expire(request_id, deadline_at)
            except Exception as exc:  # noqa: BLE001 - try again shortly
                retry_s = max(self.settings.retry_backoff_s, 0.1)
                log.warning("could not end late request %s (%s); trying again in %.1fs",
                            request_id, exc, retry_s)
                self._watch_deadline(now() + retry_s, deadline_at, request_id)

    async def _late_sweep_loop(self) -> None:
        """The deadline watch of requests no live replica watches (their ingress replica died,
        or restarted): every ``deadline_sweep_s``, end the unfinished requests in the state
        bucket that are late by more than the grace and a sweep period."""
        period = self.settings.deadline_sweep_s
        while True:
            await asyncio.sleep(period)
            try:
                cutoff = now() - DEADLINE_GRACE_S - period
                async for state in history.kept_states(self.js):
                    if not state.done and state.deadline_at and state.deadline_at < cutoff:
                        self._watch_deadline(now(), state.deadline_at, state.id)
            except Exception as exc:  # noqa: BLE001 - NATS may be back by the next sweep
                log.warning("deadline sweep failed: %s", exc)

    async def _expire(self, request_id: str, deadline_at: float) -> None:
        state = await self.tracker.get(request_id)
        if state is None or state.done:
            return
        error = DeadlineExceeded(
            f"the deadline passed {now() - deadline_at:.3f}s ago and the request had not "
            f"finished ({state.status}); its remaining work is dropped"
        )
        await self.tracker.finish(request_id, "failed", error=error_info(error))

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """A task or request exhausted its deliveries without an ack: fail the request, never
        drop it silently."""
        try:
            advisory = orjson.loads(msg.data)
            stream, seq = advisory["stream"], advisory["stream_seq"]
            if stream not in (subjects.TASKS_STREAM, subjects.REQUESTS_STREAM):
                return
            stored = await self.js.get_msg(stream, seq)
        except Exception as exc:  # noqa: BLE001 - malformed, or the message is gone already
            log.warning("max-deliveries advisory without a message: %s", exc)
            return
        deliveries = advisory.get("deliveries", self.settings.max_deliver)
        data = stored.data or b""  # an empty message reads as None
        if stream == subjects.TASKS_STREAM:
            await self._give_up_task(decode(data, Task), deliveries)
        else:
            await self._give_up_request(data, deliveries)
        try:
            await self.js.delete_msg(stream, seq)
        except Exception as exc:  # noqa: BLE001
            log.debug("could not delete a given-up message: %s", exc)

    async def _give_up_task(self, task: Task, deliveries: int) -> None:
        pool = task.plan.nodes[task.node].pool
        await self.tracker.finish(
            task.request_id,
            "failed",
            error=ErrorInfo(
                code="max_deliveries",
                message=(
                    f"node {task.node} ({pool}) did not finish the task in {deliveries} "
                    "deliveries (its replicas died or hung)"
                ),
                node=task.node,
            ),
            timings=task.timings,
        )

    async def _give_up_request(self, data: bytes, deliveries: int) -> None:
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        request_id = _client_id(raw)
        if request_id is None:
            return  # no usable id: nobody can be waiting for it
        error = TerminalError(
            f"the ingress failed on this request {deliveries} times; see its logs",
        )
        finished = await self.tracker.finish(request_id, "failed", error=error_info(error))
        if finished is None:  # never recorded (a direct NATS request): record the failure
            await self._reject(request_id, raw, error)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(30)
            try:
                await self.store.sweep()
            except Exception as exc:  # noqa: BLE001
                log.warning("store sweep failed: %s", exc)
