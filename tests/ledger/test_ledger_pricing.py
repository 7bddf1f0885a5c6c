"""Price: credits per 1,000 tokens, rounded up once, integers only."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import InvalidAmount, Price


def test_cost_rounds_up_once_on_the_sum() -> None:
    price = Price(input_per_1k=3, output_per_1k=15)
    assert price.cost(0, 0) == 0
    assert price.cost(1, 0) == 1  # 0.003 -> 1
    assert price.cost(1000, 0) == 3
    assert price.cost(1000, 1000) == 18
    assert price.cost(334, 0) == 2  # 1.002 -> 2
    assert price.cost(200, 200) == 4  # 0.6 + 3.0 = 3.6 -> 4 (not 1 + 3)
    assert Price(0, 0).cost(10**9, 10**9) == 0


def test_worst_case_is_every_max_token_produced() -> None:
    price = Price(2, 10)
    assert price.worst_case(500, 4096) == price.cost(500, 4096) == 42
    assert price.worst_case(0, 0) == 0


def test_huge_counts_stay_exact() -> None:
    price = Price(7, 9)
    n = 2**53  # the largest count accepted; a float would round here
    assert price.cost(n, n) == -(-(16 * n) // 1000)
    # Where float arithmetic would undercharge by one credit:
    assert Price(17, 0).cost(9007199254740942, 0) == 153122387330597
    assert math.ceil(17 * 9007199254740942 / 1000) == 153122387330596
    with pytest.raises(InvalidAmount):
        price.cost(n + 1, 0)


@settings(database=None)
@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
)
def test_cost_matches_exact_ceil(i_rate: int, o_rate: int, i_tok: int, o_tok: int) -> None:
    exact = Fraction(i_tok * i_rate + o_tok * o_rate, 1000)
    assert Price(i_rate, o_rate).cost(i_tok, o_tok) == math.ceil(exact)


@pytest.mark.parametrize(("i", "o"), [(-1, 0), (0, -1), (1.5, 0), (True, 1), ("1", 1)])
def test_price_rejects_bad_rates(i: object, o: object) -> None:
    with pytest.raises(InvalidAmount):
        Price(i, o)  # type: ignore[arg-type]


@pytest.mark.parametrize(("i", "o"), [(-1, 0), (0, -1), (1.0, 0), (0, False)])
def test_cost_rejects_bad_token_counts(i: object, o: object) -> None:
    with pytest.raises(InvalidAmount):
        Price(1, 1).cost(i, o)  # type: ignore[arg-type]


def test_price_is_a_frozen_value() -> None:
    price = Price(1, 2)
    assert price == Price(1, 2)
    assert hash(price) == hash(Price(1, 2))
    with pytest.raises(AttributeError):
        price.input_per_1k = 5  # type: ignore[misc]
