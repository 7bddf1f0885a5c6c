"""Racing writers on one file, and recovery after a process dies.

Every racer owns its own :class:`Ledger` (its own SQLite connection), as
separate server processes would. ``BEGIN IMMEDIATE`` must serialise them:
the reservations that succeed never add up to more than the balance.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ledger import Balance, InsufficientCredits, Ledger, ReservationClosed

BALANCE = 1000
AMOUNT = 7
THREADS = 8
ATTEMPTS = 50  # per racer: 8 * 50 * 7 = 2800 credits wanted, 1000 held


def _fund(db_path: Path, credits: int = BALANCE) -> None:
    with Ledger(db_path) as book:
        book.open_account("alice")
        book.allocate("alice", credits)


def _run_threads(target: object, count: int) -> None:
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            target(index)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_threads_racing_reservations_never_overspend(db_path: Path) -> None:
    _fund(db_path)
    barrier = threading.Barrier(THREADS)
    successes = [0] * THREADS
    refusals = [0] * THREADS

    def racer(index: int) -> None:
        with Ledger(db_path) as book:
            barrier.wait()
            for _ in range(ATTEMPTS):
                try:
                    book.reserve("alice", AMOUNT, holder=f"t{index}")
                except InsufficientCredits as exc:
                    refusals[index] += exc.available < AMOUNT
                else:
                    successes[index] += 1

    _run_threads(racer, THREADS)
    # Never more than the balance, and no credit lost to the race either.
    assert sum(successes) * AMOUNT <= BALANCE
    assert sum(successes) == BALANCE // AMOUNT
    # Every refusal saw less than AMOUNT available: none was a false negative.
    assert sum(successes) + sum(refusals) == THREADS * ATTEMPTS
    with Ledger(db_path) as book:
        assert book.balance("alice") == Balance(
            "alice", BALANCE, sum(successes) * AMOUNT, BALANCE % AMOUNT
        )
        assert book.verify() == []


def test_threads_racing_full_stream_lifecycles(db_path: Path) -> None:
    _fund(db_path)
    barrier = threading.Barrier(THREADS)
    charged = [0] * THREADS

    def racer(index: int) -> None:
        rng = random.Random(index)
        with Ledger(db_path) as book:
            barrier.wait()
            for _ in range(30):
                try:
                    res = book.reserve("alice", rng.randint(0, 40), model_id=f"m{index % 2}")
                except InsufficientCredits:
                    continue
                if rng.random() < 0.25:
                    book.release(res.id)
                else:
                    charged[index] += book.settle(res.id, rng.randint(0, 50)).charged
                with pytest.raises(ReservationClosed):
                    book.release(res.id)

    _run_threads(racer, THREADS)
    with Ledger(db_path) as book:
        assert book.balance("alice") == Balance(
            "alice", BALANCE - sum(charged), 0, BALANCE - sum(charged)
        )
        assert sum(book.usage_by_model("alice").values()) == sum(charged)
        assert book.statistics().charges_total == sum(charged)
        assert book.verify() == []


def test_threads_sharing_one_ledger_are_serialised(db_path: Path) -> None:
    _fund(db_path)
    successes = [0] * THREADS
    with Ledger(db_path) as book:

        def racer(index: int) -> None:
            for _ in range(ATTEMPTS):
                try:
                    book.reserve("alice", AMOUNT)
                except InsufficientCredits:
                    pass
                else:
                    successes[index] += 1

        _run_threads(racer, THREADS)
        assert sum(successes) == BALANCE // AMOUNT
        assert book.verify() == []


def test_connections_opening_a_fresh_file_at_once_migrate_once(db_path: Path) -> None:
    barrier = threading.Barrier(THREADS)

    def opener(index: int) -> None:
        barrier.wait()
        with Ledger(db_path) as book:
            book.open_account("shared")
            book.allocate("shared", 1, idempotency_key="once")

    _run_threads(opener, THREADS)
    with Ledger(db_path) as book:
        assert book.balance("shared").balance == 1
        assert book.verify() == []


# -- processes -------------------------------------------------------------------

RACER = """
import sys
from ledger import InsufficientCredits, Ledger
with Ledger(sys.argv[1]) as book:
    print("ready", flush=True)
    sys.stdin.readline()
    wins = 0
    for _ in range(int(sys.argv[2])):
        try:
            book.reserve("alice", int(sys.argv[3]), holder=sys.argv[4])
        except InsufficientCredits:
            pass
        else:
            wins += 1
    print(wins, flush=True)
"""


def _spawn(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_processes_racing_reservations_never_overspend(db_path: Path) -> None:
    _fund(db_path)
    procs = [_spawn(RACER, db_path, ATTEMPTS, AMOUNT, f"p{i}") for i in range(4)]
    try:
        for proc in procs:  # every racer has its connection open
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:  # then all go at once
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        wins = [int(proc.communicate(timeout=60)[0]) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sum(wins) * AMOUNT <= BALANCE
    assert sum(wins) == min(BALANCE // AMOUNT, 4 * ATTEMPTS)
    with Ledger(db_path) as book:
        assert book.balance("alice").reserved == sum(wins) * AMOUNT
        assert book.verify() == []


# -- crash recovery ----------------------------------------------------------------

KILLED_HOLDING = """
import os, signal, sys
from ledger import Ledger
book = Ledger(sys.argv[1])
res = book.reserve("alice", 300, model_id="m", streaming_session_id="s", holder="A")
print(res.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

KILLED_MID_TRANSACTION = """
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE ledger_accounts SET balance = balance + 5000")
conn.execute(
    "INSERT INTO ledger_entries (account_id, kind, amount, created_at)"
    " VALUES ('alice', 'allocation', 5000, 'x')"
)
print("written", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _run_until_killed(code: str, db_path: Path) -> str:
    proc = _spawn(code, db_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return out.strip()


def test_recover_after_a_killed_process(db_path: Path) -> None:
    _fund(db_path)
    reservation_id = _run_until_killed(KILLED_HOLDING, db_path)
    with Ledger(db_path) as book:
        (left,) = book.open_reservations("alice")
        assert (left.id, left.holder, left.amount) == (reservation_id, "A", 300)
        assert book.balance("alice") == Balance("alice", BALANCE, 300, BALANCE - 300)
        assert book.recover() == 1
        assert book.balance("alice") == Balance("alice", BALANCE, 0, BALANCE)
        assert book.recover() == 0
        assert book.charges_for_stream("s") == 0
        assert book.entries("alice")[1] == 1
        with pytest.raises(ReservationClosed):
            book.settle(reservation_id, 10)
        assert book.verify() == []


def test_recover_spares_the_live_holder(db_path: Path) -> None:
    _fund(db_path)
    dead = Ledger(db_path)
    dead.reserve("alice", 300, holder="A")
    del dead  # dropped without settling: its process is "gone"
    with Ledger(db_path) as live:
        mine = live.reserve("alice", 100, holder="B")
        assert live.recover(holder="B") == 1
        assert live.open_reservations() == [mine]
        assert live.recover(holder="B") == 0
        assert live.balance("alice") == Balance("alice", BALANCE, 100, BALANCE - 100)
        live.settle(mine.id, 40)
        assert live.balance("alice") == Balance("alice", BALANCE - 40, 0, BALANCE - 40)
        assert live.verify() == []


def test_a_transaction_cut_by_a_kill_leaves_nothing(db_path: Path) -> None:
    _fund(db_path)
    assert _run_until_killed(KILLED_MID_TRANSACTION, db_path) == "written"
    with Ledger(db_path) as book:
        assert book.balance("alice") == Balance("alice", BALANCE, 0, BALANCE)
        assert book.entries("alice")[1] == 1
        assert book.verify() == []
