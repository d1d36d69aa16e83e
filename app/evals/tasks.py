"""The `evaluator` worker role: runs evals off the request path.

Loop: claim the oldest queued eval (or a running one whose lease expired: its worker died)
with `FOR UPDATE SKIP LOCKED`, set a lease (`TUNEGATE_EVALS__LEASE`), commit. Then, with no
transaction open while a provider answers:

1. read the held-out examples from the file, once (they are stored with the eval);
2. ask every model every example through tunegate's own inference layer (the same model
   resolution and providers as `/v1/chat/completions`, so any provider works), at most
   `TUNEGATE_EVALS__CONCURRENCY` at a time, temperature 0 by default, and score the answers;
3. with a judge, ask it about every non-baseline answer, twice (both orders);
4. aggregate (app/evals/metrics.py), mark the eval succeeded and announce `eval.completed`
   (and a job event, for an eval a job asked for).

Answers are written in batches every `TUNEGATE_EVALS__WRITE_INTERVAL` (1 s), with the progress
and a renewed lease, in one short transaction that also reads the cancel flag (a cancel or a
lost lease lets the answers in flight finish, then stops); a resumed eval (its worker died)
skips what is written. A provider's passing failure (429, 5xx, timeout) is retried three times, then
recorded as that answer's error (it scores 0); a model that cannot be routed fails the eval.
Idle evaluators poll every `TUNEGATE_EVALS__POLL_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy.ext.asyncio import AsyncSession

from app.evals import judge as judging
from app.evals import metrics
from app.evals.repository import EvalQueue
from app.evals.schemas import EvalObject
from app.evals.service import default_max_tokens, read_examples, summarize
from app.files.service import get_file
from app.files.storage import BlobStorage, blob_key, make_storage
from app.inference import service as inference
from app.jobs import state
from app.kit.errors import APIError, NotFound
from app.kit.logging import get_logger
from app.kit.time import utcnow
from app.models import Eval, EvalExample, Job
from app.providers.base import Provider, ProviderError
from app.providers.registry import build_providers, close_providers
from app.webhooks.events import emit
from app.workers.runner import WorkerContext, register_role, take_work_until_stopped

log = get_logger("tunegate.evals.worker")

ROLE: Final = "evaluator"
MAX_ATTEMPTS: Final = 3
WRITE_EVERY_ANSWERS: Final = 50
RETRIES: Final = 3
JUDGE_MAX_TOKENS: Final = 16


class _LeaseLost(Exception):
    """Another evaluator took the eval over; stop without writing anything."""


class _Cancelled(Exception):
    """Someone asked to cancel the eval."""


class _Failed(Exception):
    """The eval cannot run (a model that cannot be routed, no usable example ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Reply:
    output: str | None
    error: str | None
    latency_ms: int  # of the attempt that answered (or failed last), not the retries' waits
    prompt_tokens: int | None
    completion_tokens: int | None
    retryable: bool = False  # the failure was a passing one (429, 5xx, timeout)


async def ask(provider: Provider, payload: dict[str, Any], wait_seconds: float) -> _Reply:
    """One chat completion, retried on passing failures; its text, or the error."""
    for attempt in range(RETRIES + 1):
        started = time.perf_counter()
        try:
            answer = await provider.chat_completion(payload, wait_seconds=wait_seconds)
        except ProviderError as exc:
            if exc.retryable and attempt < RETRIES:
                await asyncio.sleep(min(30.0, exc.retry_after or 2.0**attempt))
                continue
            error = str(exc) or type(exc).__name__
            return _Reply(None, error, _ms(started), None, None, retryable=exc.retryable)
        usage = answer.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        return _Reply(
            _text_of(answer),
            None,
            _ms(started),
            _count(usage.get("prompt_tokens")),
            _count(usage.get("completion_tokens")),
        )
    raise AssertionError("unreachable")  # pragma: no cover


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text_of(answer: dict[str, Any]) -> str:
    choices = answer.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


# A model whose first answers all fail for a reason that will not pass (gone, refused, not
# allowed) fails the eval instead of scoring a column of errors.
FAIL_FAST_AFTER: Final = 5


class EvalRun:
    """One claimed eval, run to its end (or until cancelled, failed or taken over)."""

    def __init__(
        self,
        worker: WorkerContext,
        providers: Mapping[str, Provider],
        storage: BlobStorage,
        claimed: Eval,
        lease: datetime,
    ) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.sessionmaker = worker.database.sessionmaker
        self.providers = dict(providers)
        self.storage = storage
        self.eval_id = claimed.id
        self.project_id = claimed.project_id
        self.models = list(claimed.models)
        self.config = dict(claimed.config)
        self.file_id = claimed.file_id
        self.examples_count = claimed.examples
        self.written = claimed.completions_done
        self.lease = lease
        self.pending_results: list[dict[str, Any]] = []
        self.pending_verdicts: dict[int, dict[str, Any]] = {}
        self.written_at = time.monotonic()
        self.write_lock = asyncio.Lock()
        self.timeout = self.settings.inference.timeout.total_seconds()
        self.answered: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        # Set when the eval was cancelled, taken over or cannot go on: the lanes take no more
        # work (what they are asking finishes; nothing is cut in the middle of a write).
        self.stopped: _Cancelled | _LeaseLost | _Failed | None = (
            _Cancelled() if claimed.cancel_requested else None
        )

    async def run(self) -> None:
        # A heartbeat writes what is pending, renews the lease and reads the cancel flag even
        # while every answer is slow (a local model on a CPU, a provider near its timeout).
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            await self._run()
        finally:
            heartbeat.cancel()

    async def _run(self) -> None:
        self._raise_if_stopped()
        examples = await self._examples()
        normalize = metrics.Normalization(**self.config.get("normalize", {}))
        expected = [example.expected for example in examples]
        json_task = metrics.expects_json(expected)
        max_tokens = self.config.get("max_tokens") or default_max_tokens(expected)
        # Every route before the first request: a judge that cannot be routed must not wait
        # until every answer is in to say so.
        routes = {model: await self._route(model) for model in self.models}
        judge = self.config.get("judge")
        judge_route = await self._route(judge["model"]) if judge else None
        async with self.sessionmaker() as session:
            done = await EvalQueue(session).done_keys(self.eval_id)

        async def answer(model: str, example: EvalExample) -> None:
            route = routes[model]
            payload = {
                "model": route.model,
                "messages": example.prompt,
                "temperature": self.config.get("temperature", 0.0),
                "max_tokens": max_tokens,
            }
            reply = await ask(route.provider, payload, self.timeout)
            self._count(model, reply)
            # Scoring a long answer (Unicode categories and names, character by character)
            # takes milliseconds: a thread, not the event loop the API and heartbeat share.
            scored = (
                await asyncio.to_thread(
                    metrics.score, reply.output, example.expected, normalize, json_task
                )
                if reply.output is not None
                else None
            )
            self.pending_results.append(
                {
                    "eval_id": self.eval_id,
                    "example": example.example,
                    "model": model,
                    "project_id": self.project_id,
                    "output": reply.output,
                    "error": reply.error,
                    "latency_ms": reply.latency_ms,
                    "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens,
                    "exact_match": scored.exact_match if scored else None,
                    "f1": scored.f1 if scored else None,
                    "valid_json": scored.valid_json if scored else None,
                }
            )
            await self._progress()

        work = [
            (lambda m=model, e=example: answer(m, e))
            for model in self.models
            for example in examples
            if (example.example, model) not in done
        ]
        await self._run_all(work)
        await self._write()
        self._raise_if_stopped()
        if judge_route is not None:
            await self._judge(examples, judge_route)
        await self._finish()

    def _count(self, model: str, reply: _Reply) -> None:
        if reply.output is not None:
            self.answered[model] = self.answered.get(model, 0) + 1
            return
        if reply.retryable:
            return
        self.refused[model] = self.refused.get(model, 0) + 1
        if self.refused[model] >= FAIL_FAST_AFTER and not self.answered.get(model):
            self.stopped = self.stopped or _Failed(
                "model_failed", f"Every request to {model} failed: {reply.error}"
            )

    # -- steps -----------------------------------------------------------------------------

    async def _examples(self) -> list[EvalExample]:
        """The stored examples, reading them from the file the first time."""
        if self.examples_count is None:
            try:
                async with self.sessionmaker() as session:
                    file = await get_file(session, self.project_id, self.file_id)
            except NotFound:
                raise _Failed("file_not_found", f"The file {self.file_id} was deleted.") from None
            async with self.storage.materialize(blob_key(file.sha256)) as path:
                found, skipped = await asyncio.to_thread(
                    read_examples,
                    path,
                    int(self.config.get("max_examples", 1000)),
                    self.settings.validation.max_line_bytes,
                )
            if not found:
                raise _Failed(
                    "no_examples",
                    f"The file {self.file_id} has no example whose last message is an assistant "
                    f"answer ({skipped} lines skipped).",
                )
            per_example = len(self.models)
            if self.config.get("judge"):
                per_example += 2 * (len(self.models) - 1)
            rows = [
                {
                    "eval_id": self.eval_id,
                    "example": index,
                    "project_id": self.project_id,
                    "line": example.line,
                    "prompt": example.prompt,
                    "expected": example.expected,
                }
                for index, example in enumerate(found)
            ]
            async with self.write_lock, self.sessionmaker() as session, session.begin():
                queue = EvalQueue(session)
                await self._still_ours(queue)
                await queue.add_examples(rows)
                await self._update(
                    queue,
                    examples=len(found),
                    skipped_lines=skipped,
                    completions_total=len(found) * per_example,
                )
        async with self.sessionmaker() as session:
            return list(await EvalQueue(session).examples(self.eval_id))

    async def _route(self, model: str) -> inference.Route:
        """Where `model` goes: an alias was pinned to its model when the eval was created, so a
        resumed eval asks the same model whatever the alias says now."""
        target = self.config.get("targets", {}).get(model, model)
        try:
            return await inference.resolve(
                self.sessionmaker, self.providers, self.project_id, target
            )
        except APIError as exc:
            raise _Failed(exc.code or "model_not_found", exc.message) from None

    async def _run_all(self, work: Sequence[Callable[[], Awaitable[None]]]) -> None:
        """Run the calls, at most `concurrency` at a time, until done or stopped."""
        pending = iter(work)

        async def lane() -> None:
            for call in pending:
                if self.stopped is not None:
                    return
                await call()

        lanes = [lane() for _ in range(self.settings.evals.concurrency)]
        async with asyncio.TaskGroup() as group:
            for running in lanes:
                group.create_task(running)

    async def _judge(self, examples: Sequence[EvalExample], route: inference.Route) -> None:
        config = self.config["judge"]
        async with self.sessionmaker() as session:
            results = await EvalQueue(session).results(self.eval_id)
        outputs = {(r.example, r.model): r.output for r in results}
        baseline = self.models[0]

        async def compare(example: EvalExample, model: str) -> None:
            ours = outputs.get((example.example, model))
            theirs = outputs.get((example.example, baseline))
            verdicts: list[judging.Verdict | None] = [None, None]
            if ours is not None and theirs is not None:
                for index, (first, second) in enumerate(((theirs, ours), (ours, theirs))):
                    messages = judging.judge_messages(
                        config["rubric"], example.prompt, example.expected, first, second
                    )
                    payload = {
                        "model": route.model,
                        "messages": messages,
                        "temperature": 0,
                        "max_tokens": JUDGE_MAX_TOKENS,
                    }
                    reply = await ask(route.provider, payload, self.timeout)
                    verdicts[index] = judging.parse_verdict(reply.output)
            outcome = judging.outcome(verdicts[0], verdicts[1])
            if ours is None and theirs is not None:
                outcome = "loss"  # no answer loses to an answer, whatever a judge would say
            elif theirs is None and ours is not None:
                outcome = "win"
            entry = self.pending_verdicts.setdefault(example.example, {})
            entry[model] = {
                "baseline_first": verdicts[0],
                "model_first": verdicts[1],
                "outcome": outcome,
            }
            await self._progress()

        work = [
            (lambda e=example, m=model: compare(e, m))
            for example in examples
            for model in self.models[1:]
            if model not in (example.judge or {})
        ]
        await self._run_all(work)
        await self._write()
        self._raise_if_stopped()

    async def _finish(self) -> None:
        async with self.sessionmaker() as session:
            queue = EvalQueue(session)
            row = await queue.get(self.eval_id)
            examples = await queue.examples(self.eval_id)
            results = await queue.results(self.eval_id)
        if row is None:
            raise _LeaseLost
        # Bootstrap and permutation tests take a while on thousands of examples: a thread,
        # not the event loop the API may share, and no transaction open meanwhile.
        summary = await asyncio.to_thread(summarize, row, examples, results, row.skipped_lines or 0)
        async with self.write_lock, self.sessionmaker() as session, session.begin():
            queue = EvalQueue(session)
            finished = await self._update(
                queue, status="succeeded", results=summary, finished_at=utcnow(), lease_until=None
            )
            await announce(session, finished)

    # -- progress ----------------------------------------------------------------------------

    async def _progress(self) -> None:
        interval = self.settings.evals.write_interval.total_seconds()
        due = time.monotonic() - self.written_at >= interval
        if due or len(self.pending_results) >= WRITE_EVERY_ANSWERS:
            await self._write()

    async def _heartbeat(self) -> None:
        every = max(0.05, self.settings.evals.lease.total_seconds() / 3)
        while True:
            await asyncio.sleep(every)
            try:
                await self._write()
            except Exception:  # the run's own next write meets the same trouble and says so
                log.warning("eval heartbeat could not write", eval_id=self.eval_id, exc_info=True)

    async def _write(self) -> None:
        """Store what is pending and renew the lease; note when the eval was cancelled or
        taken over (the lanes then stop)."""
        async with self.write_lock:
            if isinstance(self.stopped, _LeaseLost | _Cancelled):
                return
            results, self.pending_results = self.pending_results, []
            verdicts, self.pending_verdicts = self.pending_verdicts, {}
            self.written_at = time.monotonic()
            new_lease = utcnow() + self.settings.evals.lease
            written = self.written + len(results) + 2 * sum(len(v) for v in verdicts.values())
            try:
                async with self.sessionmaker() as session, session.begin():
                    queue = EvalQueue(session)
                    await self._still_ours(queue)
                    await queue.add_results(results)
                    await queue.add_verdicts(self.eval_id, verdicts)
                    row = await self._update(queue, completions_done=written, lease_until=new_lease)
            except _LeaseLost as lost:
                self.stopped = lost
                return
            self.lease = new_lease
            self.written = written
            if row.cancel_requested:
                self.stopped = _Cancelled()

    def _raise_if_stopped(self) -> None:
        if self.stopped is not None:
            raise self.stopped

    async def _still_ours(self, queue: EvalQueue) -> Eval:
        row = await queue.get_leased(self.eval_id, self.lease)
        if row is None:
            raise _LeaseLost
        return row

    async def _update(self, queue: EvalQueue, **values: Any) -> Eval:
        row = await queue.update_if_leased(self.eval_id, self.lease, **values)
        if row is None:
            raise _LeaseLost
        return row


async def announce(session: AsyncSession, row: Eval) -> None:
    """`eval.completed` (or `eval.failed`) to webhooks, and an event on the job that asked."""
    event = "eval.completed" if row.status == "succeeded" else f"eval.{row.status}"
    if event in ("eval.completed", "eval.failed"):
        data = EvalObject.of(row).model_dump(mode="json")
        await emit(session, row.project_id, event, row.id, data)
    if row.fine_tuning_job_id is None:
        return
    job = await session.get(Job, row.fine_tuning_job_id)
    if job is None:
        return
    if row.status == "succeeded":
        verdict = (row.results or {}).get("verdict") or "see the eval's results"
        message = f"Evaluation {row.id} finished: {verdict}"
    else:
        reason = (row.error or {}).get("message", "")
        message = f"Evaluation {row.id} {row.status}. {reason}".strip()
    level = "info" if row.status == "succeeded" else "warn"
    state.add_event(session, job, message, level=level, data={"eval_id": row.id})


async def process_one(
    worker: WorkerContext, providers: Mapping[str, Provider], storage: BlobStorage
) -> bool:
    """Claim and run one eval; False when there was nothing to do."""
    sessionmaker = worker.database.sessionmaker
    now = utcnow()
    lease = now + worker.settings.evals.lease
    async with sessionmaker() as session, session.begin():
        claimed = await EvalQueue(session).claim(now, lease)
        if claimed is None:
            return False
        if claimed.attempts > MAX_ATTEMPTS:
            claimed.status, claimed.finished_at, claimed.lease_until = "failed", now, None
            claimed.error = {
                "code": "evaluator_failed",
                "message": f"The evaluator stopped {MAX_ATTEMPTS} times while running this eval.",
            }
            await session.flush()
            await announce(session, claimed)
            return True
        run = EvalRun(worker, providers, storage, claimed, lease)
    outcome: dict[str, Any] | None = None
    try:
        await run.run()
    except* _LeaseLost:
        log.warning("eval lease lost; another evaluator has it", eval_id=run.eval_id)
    except* _Cancelled:
        outcome = {"status": "cancelled"}
    except* _Failed as group:
        failure = group.exceptions[0]
        assert isinstance(failure, _Failed)
        outcome = {"status": "failed", "error": {"code": failure.code, "message": failure.message}}
    except* Exception:
        log.exception("eval failed", eval_id=run.eval_id)
        outcome = {"status": "queued", "lease_until": None}  # another attempt, up to the limit
    if outcome is not None:
        if outcome["status"] != "queued":
            outcome |= {"finished_at": utcnow(), "lease_until": None}
        async with sessionmaker() as session, session.begin():
            row = await EvalQueue(session).update_if_leased(run.eval_id, run.lease, **outcome)
            if row is not None and row.status != "queued":
                await announce(session, row)
    return True


async def evaluator_loop(worker: WorkerContext, stop: asyncio.Event) -> None:
    providers = build_providers(worker.settings)
    storage = make_storage(worker.settings)
    poll = worker.settings.evals.poll_interval.total_seconds()
    try:
        await take_work_until_stopped(stop, poll, lambda: process_one(worker, providers, storage))
    finally:
        await close_providers(providers)
        await storage.close()


register_role(ROLE, evaluator_loop)
