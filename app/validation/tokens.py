"""Token counting: the counter interface, the quicktok implementation, the chat overhead rule.

The engine never calls a tokenizer directly: it hands batches of thousands of strings to a
`TokenCounter`, so another tokenizer (a Hugging Face one for a local open model) plugs in
without touching the rules. Counts are exact and have `encode_ordinary` semantics: text that
looks like a special token ("<|endoftext|>") in user data is counted as plain text.

The chat format's overhead follows OpenAI's cookbook: each message costs `TOKENS_PER_MESSAGE`
plus the tokens of its role and content, a `name` costs its tokens plus `TOKENS_PER_NAME`, and
each example costs `REPLY_PRIMING_TOKENS` more. Tool and function definitions and tool calls
are counted by their compact JSON text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final, Protocol, runtime_checkable

import quicktok

__all__ = [
    "REPLY_PRIMING_TOKENS",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "QuicktokCounter",
    "TokenCounter",
    "counter_for_encoding",
    "register_counter",
]

TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING_TOKENS: Final = 3

# Texts this long are counted one by one with `count`, which builds no token array: a batch
# call returns every token id, and one 8 MiB string can be 8 million of them (32 MB).
_LONG_TEXT_CHARS: Final = 256 * 1024
# Texts per call of quicktok's batch encoder: a whole hand-off of the validation pipeline
# (`pipeline.COUNT_TEXTS`) in one call. Alone, calls of a few hundred texts count about 10 %
# faster (their token ids stay in the CPU's cache), but every call ends by taking the GIL back
# from the parsing thread; one call per hand-off made validation about 15 % faster in all.
_CALL_TEXTS: Final = 8192


@runtime_checkable
class TokenCounter(Protocol):
    """Counts tokens exactly, many strings per call.

    Implementations should be fast on batches of thousands of short strings (that is how the
    engine calls them), thread-safe (the engine calls `count_batch` from two worker threads at
    once) and, to run in parallel with parsing, release the GIL while they count.
    """

    @property
    def name(self) -> str:
        """The tokenizer's name as reports show it, e.g. "o200k_base"."""
        ...

    def count_batch(self, texts: list[str]) -> list[int]:
        """The number of tokens of each text, in order."""
        ...


class QuicktokCounter:
    """A `TokenCounter` over a quicktok encoding (o200k_base, cl100k_base, llama3, qwen3 …).

    `threads` is passed to quicktok's batch encoder: 0 uses every core. Batch calls release
    the GIL, so the engine runs them in a worker thread while it parses the next lines.
    """

    def __init__(self, encoding: str, *, threads: int = 1) -> None:
        self._encoding: Any = quicktok.get_encoding(encoding)
        self._threads = threads
        self.name: str = encoding

    def count_batch(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        # The scan in C first: this runs holding the GIL, which the parsing thread needs.
        if max(map(len, texts)) <= _LONG_TEXT_CHARS:
            return self._batch(texts)
        long_texts = [i for i, text in enumerate(texts) if len(text) > _LONG_TEXT_CHARS]
        counts = [0] * len(texts)
        short = [i for i, text in enumerate(texts) if len(text) <= _LONG_TEXT_CHARS]
        for i, n in zip(short, self._batch([texts[i] for i in short]), strict=True):
            counts[i] = n
        for i in long_texts:
            counts[i] = int(self._encoding.count(texts[i]))
        return counts

    def _batch(self, texts: list[str]) -> list[int]:
        counts: list[int] = []
        for start in range(0, len(texts), _CALL_TEXTS):
            call = texts[start : start + _CALL_TEXTS]
            _tokens, offsets = self._encoding.encode_batch(call, self._threads, False)
            counts += (offsets[1:] - offsets[:-1]).tolist()
        return counts


_COUNTERS: dict[str, TokenCounter] = {}
_COUNTERS_LOCK = threading.Lock()
# Encodings by prefix that another module counts (`hf:<model>`: a local model's tokenizer).
_FACTORIES: dict[str, Callable[[str], TokenCounter]] = {}


def register_counter(prefix: str, factory: Callable[[str], TokenCounter]) -> None:
    """Encodings starting with `prefix` are counted by `factory(encoding)`'s counter."""
    _FACTORIES[prefix] = factory


def counter_for_encoding(encoding: str) -> TokenCounter:
    """The process-wide counter for an encoding (loading one takes about 0.5 s)."""
    with _COUNTERS_LOCK:
        counter = _COUNTERS.get(encoding)
        if counter is None:
            factory = next((f for p, f in _FACTORIES.items() if encoding.startswith(p)), None)
            made = factory(encoding) if factory is not None else QuicktokCounter(encoding)
            counter = _COUNTERS[encoding] = made
        return counter
