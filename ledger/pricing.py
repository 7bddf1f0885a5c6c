"""Model prices in credits, computed with integer arithmetic only.

A price is credits per 1,000 input tokens and per 1,000 output tokens. The
cost of a call is rounded up once, on the sum (SPEC §3: "ceil"), so a call is
never free unless both rates or both token counts are zero. No floats are
involved anywhere, so the result is exact for any size of input.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidAmount
from .validation import require_count

__all__ = ["Price"]


@dataclass(frozen=True, slots=True)
class Price:
    """Credits per 1,000 input tokens and per 1,000 output tokens (non-negative ints)."""

    input_per_1k: int
    output_per_1k: int

    def __post_init__(self) -> None:
        for name in ("input_per_1k", "output_per_1k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidAmount(f"{name} must be a non-negative integer, got {value!r}")

    def cost(self, input_tokens: int, output_tokens: int) -> int:
        """``ceil((input_tokens*input_per_1k + output_tokens*output_per_1k) / 1000)``.

        Raises :class:`InvalidAmount` for negative or non-integer token counts.
        """
        require_count("input_tokens", input_tokens)
        require_count("output_tokens", output_tokens)
        millicredits = input_tokens * self.input_per_1k + output_tokens * self.output_per_1k
        # Integer ceiling division: -(-a // b) == ceil(a / b) for b > 0.
        return -(-millicredits // 1000)

    def worst_case(self, input_tokens: int, max_tokens: int) -> int:
        """What a call can cost at most: every one of ``max_tokens`` produced.

        This is the amount a stream reserves before its upstream call.
        """
        return self.cost(input_tokens, max_tokens)
