"""Random sequences of ledger operations against a plain-Python model, on both backends.

After every step: ``verify() == []`` (the stored columns agree with the
entries and reservations, available >= 0) and every account's balance and
reservations equal the model's. On PostgreSQL one ledger serves every
example of a test, emptied between examples (``TRUNCATE``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger import (
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    LedgerBackend,
    ReservationClosed,
    SqliteLedger,
    UnknownAccount,
    open_ledger,
)

ACCOUNTS = st.sampled_from(["alice", "bob", "carol"])
# Mostly valid amounts, sometimes invalid ones (0, negatives) to exercise rejection.
CREDITS = st.one_of(st.integers(1, 500), st.integers(-3, 0), st.just(2**53))
KEYS = st.sampled_from([None, None, "k1", "k2"])


@dataclass
class OpenHold:
    account: str
    amount: int
    holder: str | None


class LedgerMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self, book: LedgerBackend, done: Callable[[], None]) -> None:
        super().__init__()
        self.book = book
        self.done = done
        self.balances: dict[str, int] = {}
        self.holds: dict[str, OpenHold] = {}
        self.closed: set[str] = set()
        self.keys: dict[tuple[str, str], int] = {}

    def teardown(self) -> None:
        self.done()

    @initialize(account=ACCOUNTS)
    def first_account(self, account: str) -> None:
        self.open_account(account)

    def available(self, account: str) -> int:
        held = sum(h.amount for h in self.holds.values() if h.account == account)
        return self.balances[account] - held

    @rule(account=ACCOUNTS)
    def open_account(self, account: str) -> None:
        self.book.open_account(account)
        self.balances.setdefault(account, 0)

    @rule(account=ACCOUNTS, credits=CREDITS, key=KEYS)
    def allocate(self, account: str, credits: int, key: str | None) -> None:
        # Arguments are validated before the account is looked up.
        if credits <= 0:
            with pytest.raises(InvalidAmount):
                self.book.allocate(account, credits, idempotency_key=key)
            return
        if account not in self.balances:
            with pytest.raises(UnknownAccount):
                self.book.allocate(account, credits, idempotency_key=key)
            return
        if key is not None and (account, key) in self.keys:
            if self.keys[account, key] != credits:
                with pytest.raises(IdempotencyConflict):
                    self.book.allocate(account, credits, idempotency_key=key)
            else:
                self.book.allocate(account, credits, idempotency_key=key)
            return
        if self.balances[account] + credits > 2**53:
            with pytest.raises(InvalidAmount):
                self.book.allocate(account, credits, idempotency_key=key)
            return
        got = self.book.allocate(account, credits, idempotency_key=key)
        self.balances[account] += credits
        if key is not None:
            self.keys[account, key] = credits
        assert got.balance == self.balances[account]

    @rule(account=ACCOUNTS, credits=CREDITS)
    def refund(self, account: str, credits: int) -> None:
        if account not in self.balances or credits <= 0 or credits + self.balances[account] > 2**53:
            with pytest.raises((UnknownAccount, InvalidAmount)):
                self.book.refund(account, credits)
            return
        entry = self.book.refund(account, credits)
        self.balances[account] += credits
        assert (entry.kind, entry.amount) == ("refund", credits)

    @rule(
        target=reservations,
        account=ACCOUNTS,
        credits=st.integers(0, 600),
        holder=st.sampled_from([None, "A", "B"]),
    )
    def reserve(self, account: str, credits: int, holder: str | None) -> object:
        if account not in self.balances:
            with pytest.raises(UnknownAccount):
                self.book.reserve(account, credits)
            return multiple()
        available = self.available(account)
        if credits > available:
            with pytest.raises(InsufficientCredits) as info:
                self.book.reserve(account, credits, holder=holder)
            assert (info.value.needed, info.value.available) == (credits, available)
            return multiple()
        res = self.book.reserve(account, credits, holder=holder)
        self.holds[res.id] = OpenHold(account, credits, holder)
        return res.id

    @rule(reservation=reservations, charge=st.integers(0, 700))
    def settle(self, reservation: str, charge: int) -> None:
        if reservation in self.closed:
            with pytest.raises(ReservationClosed):
                self.book.settle(reservation, charge)
            return
        hold = self.holds.pop(reservation)
        self.closed.add(reservation)
        settlement = self.book.settle(reservation, charge, input_tokens=1, output_tokens=2)
        charged = min(charge, hold.amount)
        assert (settlement.charged, settlement.released) == (charged, hold.amount - charged)
        assert (settlement.entry is None) == (charged == 0)
        self.balances[hold.account] -= charged

    @rule(reservation=consumes(reservations))
    def release(self, reservation: str) -> None:
        if reservation in self.closed:
            with pytest.raises(ReservationClosed):
                self.book.release(reservation)
            return
        self.holds.pop(reservation)
        self.closed.add(reservation)
        self.book.release(reservation)

    @precondition(lambda self: bool(self.holds))
    @rule(holder=st.sampled_from([None, "A"]))
    def recover(self, holder: str | None) -> None:
        stale = [rid for rid, h in self.holds.items() if holder is None or h.holder != holder]
        assert self.book.recover(holder) == len(stale)
        for rid in stale:
            del self.holds[rid]
            self.closed.add(rid)

    @invariant()
    def ledger_agrees_with_the_model(self) -> None:
        assert self.book.verify() == []
        for account, balance in self.balances.items():
            got = self.book.balance(account)
            assert got.balance == balance
            assert got.available == self.available(account) >= 0
        assert {r.id for r in self.book.open_reservations()} == set(self.holds)


SETTINGS = settings(
    max_examples=75,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture
def machines(backend: str, request: pytest.FixtureRequest) -> Iterator[Callable[[], LedgerMachine]]:
    """Makes one state machine per example, each on an empty ledger of ``backend``."""
    if backend == "sqlite":

        def fresh() -> LedgerMachine:
            book = SqliteLedger.memory()
            return LedgerMachine(book, book.close)

        yield fresh
        return
    url = request.getfixturevalue("pg_url")
    with open_ledger(url) as book, psycopg.connect(url, autocommit=True) as raw:

        def empty() -> LedgerMachine:
            raw.execute(
                "TRUNCATE ledger_entries, ledger_reservations, ledger_accounts RESTART IDENTITY"
            )
            return LedgerMachine(book, lambda: None)

        yield empty


def test_the_ledger_agrees_with_a_model(machines: Callable[[], LedgerMachine]) -> None:
    run_state_machine_as_test(machines, settings=SETTINGS)
