"""The numeric half of validation: token counting in worker threads, then per-example sums.

The rules (main thread) check each example and put what the tokenizer must count into an
`ExampleBatch`: the texts, which example each belongs to and whether it is trained, the tokens
known without a tokenizer (per-message overhead, roles), and the example's hashes. Every
`COUNT_CHARS` bytes of lines, `Pipeline.count` hands the texts gathered so far to a pool of two
threads that do nothing but call `TokenCounter.count_batch` (quicktok releases the GIL, so
counting overlaps with parsing and uses both cores). Texts that tend to repeat (system prompts,
names, tool definitions) are de-duplicated first, so a system prompt shared by every example is
counted once per hand-off.

A batch is complete after `BATCH_EXAMPLES` examples (`Pipeline.submit`). Once all its texts are
counted, the main thread finishes batches in order: `Accumulator.process` sums the counts per
example with numpy, updates the statistics and looks the hashes up in the duplicate and
conflicting-answer tables; the problems it finds go to the issue log. Keeping that bookkeeping
off the worker threads keeps them free of the GIL, and doing it for thousands of examples at
once makes numpy's per-call costs vanish.

At most `MAX_IN_FLIGHT` hand-offs are being counted at once, and a batch's texts are let go as
soon as they are counted, so memory stays flat whatever the file's size.
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

# Texts are handed to the tokenizer once this many bytes of lines (or this many texts) have
# been read since the last hand-off: large enough that per-call overheads vanish, small enough
# that the hand-offs in flight stay a few MB (a text costs two to three times its size until
# it is counted: the string and its UTF-8 copies).
COUNT_CHARS: Final = 1_000_000
COUNT_TEXTS: Final = 8_192
# A batch's examples are summed, hashed and added to the statistics together: per-example data
# is a few hundred bytes, so a batch costs about 1 MB until it is finished.
BATCH_EXAMPLES: Final = 4_096
COUNTING_THREADS: Final = 2
MAX_IN_FLIGHT: Final = 3
# ...and at most this many characters: a hand-off holding one giant text (a line near the
# 8 MiB limit) is counted before the next line is read, so two of them are never in memory.
MAX_IN_FLIGHT_CHARS: Final = 4_000_000
# Distinct examples (and prompts) remembered for duplicate detection: 20 + 16 bytes a slot,
# 2**19 slots at most, so the two tables stay under 19 MB (the tokenizer alone takes 65 MB of
# the 150 MB a validation may use).
MAX_HASH_ENTRIES: Final = 3 * 2**17

_MAX_LINE: Final = (1 << 32) - 1  # lines are kept as uint32; 0 stands for "later than that"
Issue = tuple[str, int | None, str | None, str]
Ints = npt.NDArray[np.int64]


class ExampleBatch:
    """Examples checked by the rules, their texts to count and their bookkeeping.

    Per text not yet handed to the counter: `texts[j]` and `keys[j]` = 2 * example index + 1
    if its tokens are trained (else + 0); texts likely to repeat go to `shared_texts`/
    `shared_keys` instead. `chars` approximates their size (the bytes of their lines). `jobs`
    are the hand-offs of the batch's earlier texts. Per example (index i): its line, the tokens
    known without the tokenizer (overhead, never trained), and a 16-byte digest of the whole
    canonical example. Examples that have a prompt and an answer also add their index to
    `conflict_examples`, with a 64-bit key of the prompt and a 64-bit hash of the answer (signed
    ints, as Python's hash() gives them) and the answer's message index (-1: the completion).
    `messages` has the message count of chat and DPO examples.
    """

    __slots__ = (
        "answer_keys",
        "answer_messages",
        "chars",
        "conflict_examples",
        "digests",
        "fixed",
        "jobs",
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
        self.chars = 0
        self.jobs: list[_CountJob] = []
        self.lines: list[int] = []
        self.fixed: list[int] = []
        self.digests: list[bytes] = []
        self.conflict_examples: list[int] = []
        self.prompt_keys: list[int] = []
        self.answer_keys: list[int] = []
        self.answer_messages: list[int] = []
        self.messages: list[int] = []

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
    """Texts handed to the counter at once: the direct texts, then each shared text once.

    Takes the batch's texts and their keys (the batch starts new lists).
    """

    def __init__(self, batch: ExampleBatch) -> None:
        index: dict[str, int] = {}
        self.shared_inverse = [index.setdefault(t, len(index)) for t in batch.shared_texts]
        self.direct = len(batch.texts)
        self.texts = batch.texts + list(index) if index else batch.texts
        self.keys = batch.keys
        self.shared_keys = batch.shared_keys
        self.chars = batch.chars
        batch.texts, batch.keys, batch.shared_texts, batch.shared_keys = [], [], [], []
        batch.chars = 0
        self.future: Future[list[int]] | None = None

    def run(self, counter: TokenCounter) -> list[int]:
        """Count (in a worker thread), then let the texts go: quicktok caches a UTF-8 copy in
        each string it reads, which would double their memory until the batch is finished."""
        try:
            return counter.count_batch(self.texts)
        finally:
            self.texts = []

    def per_text(self) -> tuple[npt.NDArray[np.intp], Ints]:
        """(key, tokens) of every text handed off, shared texts once per occurrence."""
        assert self.future is not None
        counts = np.asarray(self.future.result(), dtype=np.int64)
        keys = np.asarray(self.keys, dtype=np.intp)
        if not self.shared_inverse:
            return keys, counts
        shared = counts[self.direct :][np.asarray(self.shared_inverse, dtype=np.intp)]
        return (
            np.concatenate((keys, np.asarray(self.shared_keys, dtype=np.intp))),
            np.concatenate((counts[: self.direct], shared)),
        )


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

    def process(self, batch: ExampleBatch) -> list[Issue]:
        """Add a batch whose texts are all counted; the problems found, in line order."""
        n = len(batch)
        if not n:
            return []
        issues: list[Issue] = []
        totals, trained = self._sum(batch, n)
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
    def _sum(batch: ExampleBatch, n: int) -> tuple[Ints, Ints]:
        totals = np.asarray(batch.fixed, dtype=np.int64)
        if not batch.jobs:
            return totals, np.zeros(n, dtype=np.int64)
        keys, counts = zip(*(job.per_text() for job in batch.jobs), strict=True)
        sums = np.bincount(np.concatenate(keys), np.concatenate(counts), minlength=2 * n)
        trained = sums[1::2].astype(np.int64)
        totals += sums[0::2].astype(np.int64) + trained
        return totals, trained

    def _find_duplicates(self, batch: ExampleBatch, issues: list[Issue]) -> None:
        keys = np.frombuffer(b"".join(batch.digests), dtype="<u8").reshape(-1, 2)
        lines = _stored_lines(batch.lines).astype(np.uint32)
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
        lines = _stored_lines(example_lines).astype(np.uint64)
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


def _stored_lines(lines: list[int]) -> Ints:
    """Line numbers as the tables keep them: 0 past what a uint32 holds."""
    numbers = np.asarray(lines, dtype=np.int64)
    numbers[numbers > _MAX_LINE] = 0
    return numbers


def _answer_path(message: int) -> str:
    return "completion" if message < 0 else f"messages[{message}]"


def _line(stored: Any) -> str:
    line = int(stored)
    return f"line {line}" if line else "an earlier example"


class Pipeline:
    """Counts texts in worker threads; finishes complete batches in order on the caller's thread."""

    def __init__(self, counter: TokenCounter, accumulator: Accumulator, issues: IssueLog) -> None:
        self._counter = counter
        self._accumulator = accumulator
        self._issues = issues
        self._executor = ThreadPoolExecutor(COUNTING_THREADS, thread_name_prefix="validation")
        self._counting: deque[_CountJob] = deque()  # handed off, maybe not counted yet
        self._counting_chars = 0
        self._complete: deque[ExampleBatch] = deque()  # submitted, not finished yet

    def count(self, batch: ExampleBatch) -> None:
        """Hand the texts the batch gathered since the last hand-off to a counting thread."""
        if not batch.texts and not batch.shared_texts:
            batch.chars = 0
            return
        job = _CountJob(batch)
        job.future = self._executor.submit(job.run, self._counter)
        batch.jobs.append(job)
        self._counting.append(job)
        self._counting_chars += job.chars
        while self._counting and (
            len(self._counting) > MAX_IN_FLIGHT or self._counting_chars > MAX_IN_FLIGHT_CHARS
        ):
            oldest = self._counting.popleft()
            self._counting_chars -= oldest.chars
            assert oldest.future is not None
            oldest.future.result()  # raises what the counter raised
        # A complete batch is finished once its texts are counted, which they are by the time
        # the next batch is complete: finishing it does not wait on the counting threads.
        while len(self._complete) > 1:
            self._finish_oldest()

    def submit(self, batch: ExampleBatch) -> None:
        """The batch is complete: count its last texts, finish it once they are counted."""
        self.count(batch)
        self._complete.append(batch)

    def finish(self) -> None:
        """Wait for the texts in flight and finish every batch submitted."""
        while self._complete:
            self._finish_oldest()
        self._executor.shutdown(wait=True)

    def close(self) -> None:
        """Stop without waiting for the results (on cancellation or error)."""
        self._counting.clear()
        self._complete.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _finish_oldest(self) -> None:
        batch = self._complete.popleft()
        for code, line, path, message in self._accumulator.process(batch):
            self._issues.add(code, line, path, message)
