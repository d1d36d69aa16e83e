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


# Films for the sentiment sets: a few dozen titles, each a 「這部X真棒。」 -> 1 line and a
# 「這部X糟透了。」 -> 0 line (the seed's pattern; its 14 lines are too few to split).
FILMS = (
    "教父 鐵達尼號 阿凡達 星際效應 全面啟動 駭客任務 侏羅紀公園 魔戒 神鬼戰士 阿甘正傳 "
    "霍爾的移動城堡 神隱少女 龍貓 玩具總動員 冰雪奇緣 獅子王 海底總動員 大白鯊 異形 "
    "終極警探 回到未來 小丑 寄生上流 臥虎藏龍 英雄 少年Pi的奇幻漂流 悲慘世界 黑天鵝 "
    "樂來越愛你 蜘蛛人 鋼鐵人 雷神索爾 美國隊長 復仇者聯盟 變形金剛 哥吉拉"
).split()


def sentiment_jsonl(films: tuple[str, ...] | list[str] = FILMS) -> bytes:
    """Two chat lines per film, positive (1) then negative (0)."""
    lines = []
    for film in films:
        for text, label in ((f"這部{film}真棒。", "1"), (f"這部{film}糟透了。", "0")):
            example = {
                "messages": [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": label},
                ]
            }
            lines.append(json.dumps(example, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()
