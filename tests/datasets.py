"""Small training datasets for the jobs tests: "add two numbers" in OpenAI's chat format."""

from __future__ import annotations

import json


def adder_jsonl(count: int, *, shift: int = 0) -> bytes:
    """`count` chat examples `i + i + shift = …`; a different `shift` gives different content."""
    return b"".join(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "You add numbers."},
                    {"role": "user", "content": f"{i} + {i + shift}?"},
                    {"role": "assistant", "content": str(2 * i + shift)},
                ]
            }
        ).encode()
        + b"\n"
        for i in range(count)
    )
