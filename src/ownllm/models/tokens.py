"""What a tokenizer makes of a text: tokens with ids, counts, chars per token, and what it would cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ownllm.errors import check_text


@dataclass(frozen=True)
class TokenReport:
    tokens: list[tuple[int, str]]  # (id, the text of that token alone)
    characters: int
    words: int
    price_per_1m: float | None = None

    @property
    def count(self) -> int:
        return len(self.tokens)

    @property
    def chars_per_token(self) -> float:
        return self.characters / self.count if self.count else 0.0

    @property
    def cost(self) -> float | None:
        return None if self.price_per_1m is None else self.count * self.price_per_1m / 1_000_000

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": [{"id": i, "token": t} for i, t in self.tokens],
            "count": self.count,
            "characters": self.characters,
            "words": self.words,
            "chars_per_token": round(self.chars_per_token, 3),
            "price_per_1m": self.price_per_1m,
            "cost": self.cost,
        }


def token_report(tokenizer: Any, text: str, *, price_per_1m: float | None = None) -> TokenReport:
    check_text(text, "text")
    ids = tokenizer.encode(text, add_special_tokens=False)
    return TokenReport(
        tokens=[(i, tokenizer.decode([i])) for i in ids],
        characters=len(text),
        words=len(text.split()),
        price_per_1m=price_per_1m,
    )
