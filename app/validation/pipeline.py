"""The numeric half of validation: token counting in worker threads, then per-example sums.

The rules (main thread) check each example and put what the tokenizer must count into an
`ExampleBatch`: the texts, which example each belongs to and whether it is trained, the tokens
known without a tokenizer (per-message overhead, roles), and the example's hashes. When a batch
is full, `Pipeline.submit` hands its texts to a pool of two threads that do nothing but call
`TokenCounter.count_batch` (quicktok releases the GIL, so counting overlaps with parsing and
uses both cores). Texts that tend to repeat (system prompts, names, tool definitions) are
de-duplicated first, so a system prompt shared by every example is counted once per batch.

Results are taken in submission order by the main thread, where `Accumulator.process` sums
the counts per example with numpy, updates the statistics and looks the hashes up in the
duplicate and conflicting-answer tables; the problems it finds go to the issue log. Keeping
that bookkeeping off the worker threads keeps them free of the GIL.

At most `MAX_IN_FLIGHT` batches are being counted at once, so memory stays flat whatever the
file's size.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from app.validation.hashtable import HashTable
from app.validation.issues import IssueLog
from app.validation.stats import Distribution
from app.validation.tokens import TokenCounter

__all__ = ["Accumulator", "ExampleBatch", "Pipeline"]

# A batch is handed to the tokenizer once it holds this many texts or characters: large enough
# that per-call overheads vanish, small enough that two batches in flight stay a few MB.
BATCH_TEXTS: Final = 8_192
BATCH_CHARS: Final = 1_000_000
COUNTING_THREADS: Final = 2
MAX_IN_FLIGHT: Final = 3
# ...and at most this many characters: a batch holding one giant text (a line near the 8 MiB
# limit) is finished before the next line is read, so two of them are never in memory at once.
MAX_IN_FLIGHT_CHARS: Final = 4_000_000
# Distinct examples (and prompts) remembered for duplicate detection: 20 + 16 bytes a slot,
# 2**19 slots at most, so the two tables stay under 19 MB (the tokenizer alone takes 65 MB of
# the 150 MB a validation may use).
MAX_HASH_ENTRIES: Final = 3 * 2**17

_MAX_LINE: Final = (1 << 32) - 1  # lines are kept as uint32; 0 stands for "later than that"
Issue = tuple[str, int | None, str | None, str]


class ExampleBatch:
    """Examples checked by the rules whose tokens are not counted yet.

    Per text: `texts[j]` and `keys[j]` = 2 * example index + 1 if its tokens are trained (else
    + 0); texts likely to repeat go to `shared_texts`/`shared_keys` instead. Per example
    (index i): its line, the tokens known without the tokenizer (overhead, never trained), and
    a 16-byte digest of the whole canonical example. Examples that have a prompt and an answer
    also add their index to `conflict_examples`, with a 64-bit key of the prompt and a 64-bit
    hash of the answer (signed ints, as Python's hash() gives them) and the answer's message
    index (-1: the completion). `messages` has the message count of chat and DPO examples.
    `chars` approximates the batch's size (the bytes of its lines).
    """

    __slots__ = (
        "answer_keys",
        "answer_messages",
        "chars",
        "conflict_examples",
        "digests",
        "fixed",
        "keys",
        "lines",
        "messages",
        "prompt_keys",
        "shared_keys",
        "shared_texts",
        "texts",
    )

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.keys: list[int] = []
        self.shared_texts: list[str] = []
        self.shared_keys: list[int] = []
        self.lines: list[int] = []
        self.fixed: list[int] = []
        self.digests: list[bytes] = []
        self.conflict_examples: list[int] = []
        self.prompt_keys: list[int] = []
        self.answer_keys: list[int] = []
        self.answer_messages: list[int] = []
        self.messages: list[int] = []
        self.chars = 0

    def __len__(self) -> int:
        return len(self.lines)

    def mark(self) -> tuple[int, int]:
        """Where the texts of the example being checked start (see `rollback`)."""
        return len(self.texts), len(self.shared_texts)

    def rollback(self, mark: tuple[int, int]) -> None:
        """Forget the texts added since `mark`: the example had an error."""
        direct, shared = mark
        del self.texts[direct:], self.keys[direct:]
        del self.shared_texts[shared:], self.shared_keys[shared:]


class _CountJob:
    """A batch's texts as handed to the counter: the direct texts, then each shared text once."""

    def __init__(self, batch: ExampleBatch) -> None:
        index: dict[str, int] = {}
        self.shared_inverse = [index.setdefault(t, len(index)) for t in batch.shared_texts]
        self.direct = len(batch.texts)
        self.texts = batch.texts + list(index) if index else batch.texts
        self._batch = batch

    def run(self, counter: TokenCounter) -> list[int]:
        """Count (in a worker thread), then let the texts go: quicktok caches a UTF-8 copy in
        each string it reads, which would double the batch's memory until it is finished."""
        try:
            return counter.count_batch(self.texts)
        finally:
            self.texts = []
            self._batch.texts.clear()
            self._batch.shared_texts.clear()


class Accumulator:
    """Token totals, statistics and hash tables; used by the main thread only."""

    def __init__(self, context_limit: int, model_id: str) -> None:
        # Read at construction, so a test can lower it.
        max_entries = MAX_HASH_ENTRIES
        self._limit = context_limit
        self._model_id = model_id
        # 16-byte example digest -> its line; 64-bit prompt key -> answer hash << 32 | line.
        self.duplicates = HashTable(max_entries, wide=True, value_dtype=np.uint32)
        self.prompts = HashTable(max_entries, wide=False, value_dtype=np.uint64)
        self.total_tokens = Distribution()
        self.trained_tokens = Distribution()
        self.messages = Distribution()
        self.billable_per_epoch = 0

    def process(self, batch: ExampleBatch, job: _CountJob, counts: list[int]) -> list[Issue]:
        n = len(batch)
        if not n:
            return []
        issues: list[Issue] = []
        totals, trained = self._sum(batch, job, counts, n)
        self.total_tokens.add_array(totals)
        self.trained_tokens.add_array(trained)
        if batch.messages:
            self.messages.add_array(np.asarray(batch.messages, dtype=np.int64))
        self.billable_per_epoch += int(np.minimum(totals, self._limit).sum())
        lines = batch.lines
        for i in np.flatnonzero(totals > self._limit).tolist():
            issues.append(
                (
                    "over_context_limit",
                    lines[i],
                    None,
                    f"{int(totals[i])} tokens, over the {self._limit}-token context limit of "
                    f"{self._model_id}: the example would be truncated",
                )
            )
        self._find_duplicates(batch, issues)
        self._find_conflicts(batch, issues)
        return issues

    @staticmethod
    def _sum(
        batch: ExampleBatch, job: _CountJob, counts: list[int], n: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        totals = np.asarray(batch.fixed, dtype=np.int64)
        if not counts:
            return totals, np.zeros(n, dtype=np.int64)
        per_text = np.asarray(counts, dtype=np.int64)
        keys = np.asarray(batch.keys, dtype=np.intp)
        if job.shared_inverse:
            shared = per_text[job.direct :][np.asarray(job.shared_inverse, dtype=np.intp)]
            per_text = np.concatenate((per_text[: job.direct], shared))
            keys = np.concatenate((keys, np.asarray(batch.shared_keys, dtype=np.intp)))
        sums = np.bincount(keys, weights=per_text, minlength=2 * n).astype(np.int64)
        trained = sums[1::2]
        totals += sums[0::2] + trained
        return totals, trained

    def _find_duplicates(self, batch: ExampleBatch, issues: list[Issue]) -> None:
        keys = np.frombuffer(b"".join(batch.digests), dtype="<u8").reshape(-1, 2)
        lines = np.asarray([x if x <= _MAX_LINE else 0 for x in batch.lines], dtype=np.uint32)
        found, first = self.duplicates.insert(keys[:, 0].copy(), keys[:, 1].copy(), lines)
        for i in np.flatnonzero(found).tolist():
            issues.append(
                (
                    "duplicate_examples",
                    batch.lines[i],
                    None,
                    f"an exact duplicate of {_line(first[i])}",
                )
            )

    def _find_conflicts(self, batch: ExampleBatch, issues: list[Issue]) -> None:
        if not batch.conflict_examples:
            return
        keys = np.array(batch.prompt_keys, dtype=np.int64).view(np.uint64)
        answers = np.array(batch.answer_keys, dtype=np.int64).view(np.uint64) >> np.uint64(32)
        example_lines = [batch.lines[i] for i in batch.conflict_examples]
        lines = np.asarray([x if x <= _MAX_LINE else 0 for x in example_lines], np.uint64)
        found, stored = self.prompts.insert(keys, None, (answers << np.uint64(32)) | lines)
        differs = found & ((stored >> np.uint64(32)) != answers)
        for j in np.flatnonzero(differs).tolist():
            issues.append(
                (
                    "conflicting_answers",
                    example_lines[j],
                    _answer_path(batch.answer_messages[j]),
                    f"the same prompt as {_line(stored[j] & np.uint64(_MAX_LINE))}, "
                    "with a different answer",
                )
            )


def _answer_path(message: int) -> str:
    return "completion" if message < 0 else f"messages[{message}]"


def _line(stored: Any) -> str:
    line = int(stored)
    return f"line {line}" if line else "an earlier example"


class Pipeline:
    """Counts full batches in worker threads; finishes them in order on the caller's thread."""

    def __init__(self, counter: TokenCounter, accumulator: Accumulator, issues: IssueLog) -> None:
        self._counter = counter
        self._accumulator = accumulator
        self._issues = issues
        self._executor = ThreadPoolExecutor(COUNTING_THREADS, thread_name_prefix="validation")
        self._pending: deque[tuple[ExampleBatch, _CountJob, Future[list[int]]]] = deque()
        self._pending_chars = 0

    def submit(self, batch: ExampleBatch) -> None:
        job = _CountJob(batch)
        future = self._executor.submit(job.run, self._counter)
        self._pending.append((batch, job, future))
        self._pending_chars += batch.chars
        while self._pending and (
            len(self._pending) > MAX_IN_FLIGHT or self._pending_chars > MAX_IN_FLIGHT_CHARS
        ):
            self._finish_oldest()

    def finish(self) -> None:
        """Wait for the batches in flight and record their problems."""
        while self._pending:
            self._finish_oldest()
        self._executor.shutdown(wait=True)

    def close(self) -> None:
        """Stop without waiting for the results (on cancellation or error)."""
        self._pending.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _finish_oldest(self) -> None:
        batch, job, future = self._pending.popleft()
        self._pending_chars -= batch.chars
        for code, line, path, message in self._accumulator.process(batch, job, future.result()):
            self._issues.add(code, line, path, message)
