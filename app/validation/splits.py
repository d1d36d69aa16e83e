"""Deterministic train/validation splits of JSONL training files.

`split_file` sends each non-blank line of a JSONL file (any format: chat, DPO, prompt/completion,
Gemini, Vertex) to a train or a validation file. The same input and seed always give
byte-identical outputs; each line lands in exactly one output, in its original order; blank
lines are dropped and every output line ends with a newline. Copies of one example (the same
JSON, whatever its key order or spacing) all go to the same file: no example is in both.

The file is read twice and never held in memory. The first pass notes an 8-byte hash of each
example (and, to stratify, a small label id); the validation examples are then chosen during the
second pass by selection sampling (Knuth's Algorithm S) over the distinct examples, which picks
exactly the wanted number uniformly at random, remembering only the choices made for examples
that occur more than once. Lines are copied in bounded pieces; a line is parsed whole only up to
MAX_PARSED_LINE_BYTES (a longer one counts as an example of its own, unlabelled).
"""

from __future__ import annotations

import codecs
import random
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np
import orjson

__all__ = [
    "MAX_FRACTION",
    "MAX_LABELS",
    "MIN_FRACTION",
    "UNLABELLED",
    "SplitOptions",
    "SplitResult",
    "split_file",
]

MIN_FRACTION: Final = 0.05
MAX_FRACTION: Final = 0.5
# Stratifying only makes sense for classification-like data; a cap keeps the label table (and
# the report) small when every answer is different.
MAX_LABELS: Final = 1000
# The label under which lines without one (not JSON, no answer, an answer that is not text, a
# line too long to parse) are stratified and reported.
UNLABELLED: Final = "(no label)"
# Lines longer than this are not parsed (for their label or to find their copies), which
# bounds the memory of the first pass.
MAX_PARSED_LINE_BYTES: Final = 64 * 1024 * 1024

_PIECE_BYTES: Final = 1024 * 1024
_UTF8_BOM: Final = codecs.BOM_UTF8
_WHITESPACE: Final = b" \t\n\r\x0b\x0c"


@dataclass(frozen=True)
class SplitOptions:
    """`validation_fraction` (MIN_FRACTION to MAX_FRACTION) of the examples go to validation."""

    validation_fraction: float
    seed: int = 0
    # Split each label (the example's answer) separately, keeping label proportions.
    stratify_by_label: bool = False


@dataclass
class SplitResult:
    """Example counts per output and, when stratified, per label: {"train": n, "validation": m}."""

    train_examples: int
    validation_examples: int
    labels: dict[str, dict[str, int]] | None = None


def split_file(
    source: Path, train: BinaryIO, validation: BinaryIO, options: SplitOptions
) -> SplitResult:
    """Split the JSONL file at `source` into `train` and `validation`.

    Raises ValueError, before anything is written, when the fraction is out of range, the file
    has fewer than 2 examples, is not JSONL, or (stratified) has more than MAX_LABELS labels.
    """
    fraction = options.validation_fraction
    # `not (a <= x <= b)` also refuses NaN.
    if isinstance(fraction, bool) or not (MIN_FRACTION <= fraction <= MAX_FRACTION):
        raise ValueError(
            f"validation_fraction must be between {MIN_FRACTION} and {MAX_FRACTION}, not {fraction}"
        )
    source = Path(source)
    rng = random.Random(options.seed)
    stratify = options.stratify_by_label
    names, label_ids, hashes = _survey(source, stratify)
    copied = _copied(hashes)
    # Distinct examples per label (one label when not stratifying): what is sampled.
    counts = [0] * max(len(names), 1)
    first_seen: set[int] = set()
    for index, example_hash in enumerate(hashes):
        if example_hash in copied:
            if example_hash in first_seen:
                continue
            first_seen.add(example_hash)
        counts[label_ids[index] if stratify else 0] += 1
    del first_seen
    distinct = sum(counts)
    if distinct < 2:
        raise ValueError(
            f"the file has {len(hashes)} example{'' if len(hashes) == 1 else 's'}"
            + (f" ({distinct} distinct)" if distinct != len(hashes) else "")
            + "; a split needs at least 2 different ones, one for each file"
        )
    wanted = _sizes(counts, fraction, rng) if stratify else [_size(distinct, fraction)]
    choose = _sampler(rng, wanted, counts)
    decided: dict[int, bool] = {}  # the side of each example that has copies, once chosen
    per_label = [[0, 0] for _ in counts]

    def to_validation(index: int) -> bool:
        example_hash = hashes[index]
        label = label_ids[index] if stratify else 0
        chosen = decided.get(example_hash)
        if chosen is None:
            chosen = choose(label)
            if example_hash in copied:
                decided[example_hash] = chosen
        per_label[label][chosen] += 1
        return chosen

    written = _write(source, to_validation, train, validation)
    return SplitResult(
        train_examples=written[0],
        validation_examples=written[1],
        labels={
            name: {"train": sides[0], "validation": sides[1]}
            for name, sides in zip(names, per_label, strict=True)
        }
        if stratify
        else None,
    )


def _size(examples: int, fraction: float) -> int:
    """How many of `examples` (>= 2) go to validation: at least one, and one kept for train."""
    return min(max(round(fraction * examples), 1), examples - 1)


def _sizes(counts: list[int], fraction: float, rng: random.Random) -> list[int]:
    """How many of each label go to validation, `_size(total)` in all, as close to `fraction`
    of each label as whole examples allow (largest remainders first; a label of two or more
    keeps one for train). A label of one example goes to one side: with answers that are
    mostly different, the split is then a plain random one of the wanted size."""
    quotas = [fraction * count for count in counts]
    caps = [count - 1 if count > 1 else count for count in counts]
    wanted = [min(int(quota), cap) for quota, cap in zip(quotas, caps, strict=True)]
    missing = _size(sum(counts), fraction) - sum(wanted)
    # At equal remainders a label of two or more gives first (a label of one example sent to
    # validation is never trained on); the remaining ties (many labels of one example each)
    # are broken at random, so the seed decides which.
    order = sorted(
        range(len(counts)),
        key=lambda label: (wanted[label] - quotas[label], counts[label] == 1, rng.random()),
    )
    while missing > 0:
        open_labels = [label for label in order if wanted[label] < caps[label]][:missing]
        if not open_labels:  # not reached: the caps add up to at least half the examples
            break
        for label in open_labels:
            wanted[label] += 1
        missing -= len(open_labels)
    return wanted


def _sampler(rng: random.Random, wanted: list[int], available: list[int]) -> Callable[[int], bool]:
    """Selection sampling per group: call once per line, in order; True means validation.

    Choosing each line with probability (still wanted) / (still available) picks exactly
    `wanted` of `available` lines, every subset equally likely, without storing any choice.
    """
    wanted, available = list(wanted), list(available)

    def choose(group: int) -> bool:
        # When wanted == available the probability is exactly 1.0 and random() < 1.0 always;
        # when wanted == 0 it is 0.0: the count is exact, not just expected.
        chosen = rng.random() < wanted[group] / available[group]
        available[group] -= 1
        wanted[group] -= chosen
        return chosen

    return choose


# --- reading ------------------------------------------------------------------------------------


def _pieces(source: Path) -> Iterator[tuple[bytes, bool]]:
    """The file in pieces of at most _PIECE_BYTES: (piece, whether it ends a line).

    A UTF-8 BOM at the start is dropped: it belongs to no line, and copied into an output it
    would sit at the start of some line in the middle of a file.
    """
    with source.open("rb") as f:
        first = True
        while piece := f.readline(_PIECE_BYTES):
            if first:
                first = False
                piece = piece.removeprefix(_UTF8_BOM)
                if not piece:
                    continue
            yield piece, piece.endswith(b"\n")


def _check_jsonl(first_line: bytes) -> None:
    if not first_line.startswith(b"{"):
        raise ValueError(
            "the file is not JSON Lines (its first example is not a JSON object); convert CSV "
            "files to JSONL before splitting them"
        )


def _survey(source: Path, stratify: bool) -> tuple[list[str], array[int], array[int]]:
    """The first pass: label names in order of appearance and each example's label id (when
    stratifying), and each example's hash (`_example_hash`), one per example."""
    names: list[str] = []
    ids: dict[str, int] = {}
    # 4 and 8 bytes per example, however long the examples and labels.
    label_ids: array[int] = array("I")
    hashes: array[int] = array("q")
    with source.open("rb") as f:
        for line in _whole_lines(f):
            if not hashes:
                _check_jsonl(line.lstrip(_WHITESPACE))
            value = _parsed(line)
            hashes.append(_example_hash(line, value, len(hashes)))
            if not stratify:
                continue
            label = _label(value)
            if label not in ids:
                if len(names) == MAX_LABELS:
                    raise ValueError(
                        f"stratify_by_label suits classification data, but the file has more "
                        f"than {MAX_LABELS} different answers; split it without stratification"
                    )
                ids[label] = len(names)
                names.append(label)
            label_ids.append(ids[label])
    return names, label_ids, hashes


_UNPARSED: Final = object()  # a line that is not JSON, or too long to parse


def _parsed(line: bytes) -> Any:
    try:
        return orjson.loads(line) if line else _UNPARSED
    except orjson.JSONDecodeError:
        return _UNPARSED


def _example_hash(line: bytes, value: Any, index: int) -> int:
    """Equal for copies of one example: its JSON with sorted keys (key order and spacing do not
    matter), else its stripped bytes; a line too long to parse is unlike any other."""
    if value is not _UNPARSED:
        try:
            return hash(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
        except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels)
            pass
    if line:
        return hash(line.strip(_WHITESPACE))
    return hash(("too long to compare", index))


def _copied(hashes: array[int]) -> set[int]:
    """The hashes that occur more than once: examples with copies."""
    if not hashes:
        return set()
    values, occurrences = np.unique(np.frombuffer(hashes, dtype=np.int64), return_counts=True)
    return set(values[occurrences > 1].tolist())


def _whole_lines(f: BinaryIO) -> Iterator[bytes]:
    """The non-blank lines, whole; a line over MAX_PARSED_LINE_BYTES yields b"" instead.

    Must see the same non-blank lines as `_pieces` does, in the same order: the label ids are
    matched to lines by position.
    """
    limit = MAX_PARSED_LINE_BYTES
    first = True
    # limit + 1: a line of exactly `limit` bytes plus its newline is still read whole.
    while line := f.readline(limit + 1):
        too_long = len(line) > limit and not line.endswith(b"\n")
        if first:
            first = False
            line = line.removeprefix(_UTF8_BOM)
        if too_long:
            nonblank = bool(line.strip(_WHITESPACE))
            while rest := f.readline(_PIECE_BYTES):  # skip the rest in bounded reads
                nonblank = nonblank or bool(rest.strip(_WHITESPACE))
                if rest.endswith(b"\n"):
                    break
            if nonblank:
                yield b""
        elif line.strip(_WHITESPACE):
            yield line


def _label(value: Any) -> str:
    """The example's answer, stripped: what stratification keeps in proportion."""
    if not isinstance(value, dict):
        return UNLABELLED
    answer: Any = None
    if "messages" in value:  # chat: the last assistant message
        answer = _last_content(value["messages"], "role", "assistant")
    elif "preferred_output" in value:  # DPO: the preferred answer's last message
        answer = _last_content(value["preferred_output"], None, None)
    elif "completion" in value:  # legacy prompt/completion
        answer = value["completion"]
    elif "output_text" in value:  # Vertex text
        answer = value["output_text"]
    elif "contents" in value:  # Gemini: the last model turn, text parts joined
        turn = _last_content(value["contents"], "role", "model", content_key="parts")
        answer = turn if isinstance(turn, list) else None
    text = _text(answer)
    # Stripped, so that " 1\n" (legacy-prepared) and "1" are the same class.
    return UNLABELLED if text is None else text.strip()


def _last_content(
    messages: Any, key: str | None, role: str | None, content_key: str = "content"
) -> Any:
    """The content of the last message (with message[key] == role, when key is given)."""
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and (key is None or message.get(key) == role):
            return message.get(content_key)
    return None


def _text(content: Any) -> str | None:
    """A string, or a list of parts that all have text (chat text parts, Gemini parts) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(part["text"] for part in content)
    return None


# --- writing ------------------------------------------------------------------------------------


def _write(
    source: Path,
    to_validation: Callable[[int], bool],
    train: BinaryIO,
    validation: BinaryIO,
) -> tuple[int, int]:
    """Copy each non-blank line to train or validation; `to_validation(index)` decides.

    Returns (train lines, validation lines). `to_validation` is called once per non-blank line,
    in order, with the line's 0-based index among the non-blank lines.
    """
    written = [0, 0]
    out: BinaryIO | None = None  # where the current line goes, once it is known to be non-blank
    # Whitespace at the start of a line, kept until the line proves non-blank or ends blank.
    held: list[bytes] = []
    index = 0
    for piece, ends in _pieces(source):
        if out is None:
            if piece.strip(_WHITESPACE):
                chosen = to_validation(index)
                index += 1
                written[chosen] += 1
                out = validation if chosen else train
                for whitespace in held:
                    out.write(whitespace)
                held.clear()
                out.write(piece)
            elif not ends:
                held.append(piece)
        else:
            out.write(piece)
        if ends:
            out = None
            held.clear()
    if out is not None:
        out.write(b"\n")  # the last line had no newline
    return written[0], written[1]
