"""Racing writers on one database, and recovery after a process dies, on both backends.

Every racer owns its own ledger (its own SQLite connection, or its own
PostgreSQL pool), as separate server processes would. ``BEGIN IMMEDIATE``
(SQLite) or the account's row lock (PostgreSQL) must serialise them: the
reservations that succeed never add up to more than the balance.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading

import pytest

from ledger import Balance, InsufficientCredits, ReservationClosed

from .conftest import Target

BALANCE = 1000
AMOUNT = 7
THREADS = 8
ATTEMPTS = 50  # per racer: 8 * 50 * 7 = 2800 credits wanted, 1000 held


def _fund(target: Target, credits: int = BALANCE) -> None:
    with target.open() as book:
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


def test_threads_racing_reservations_never_overspend(target: Target) -> None:
    _fund(target)
    barrier = threading.Barrier(THREADS)
    successes = [0] * THREADS
    refusals = [0] * THREADS

    def racer(index: int) -> None:
        with target.open() as book:
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
    with target.open() as book:
        assert book.balance("alice") == Balance(
            "alice", BALANCE, sum(successes) * AMOUNT, BALANCE % AMOUNT
        )
        assert book.verify() == []


def test_threads_racing_full_stream_lifecycles(target: Target) -> None:
    _fund(target)
    barrier = threading.Barrier(THREADS)
    charged = [0] * THREADS

    def racer(index: int) -> None:
        rng = random.Random(index)
        with target.open() as book:
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
    with target.open() as book:
        assert book.balance("alice") == Balance(
            "alice", BALANCE - sum(charged), 0, BALANCE - sum(charged)
        )
        assert sum(book.usage_by_model("alice").values()) == sum(charged)
        assert book.statistics().charges_total == sum(charged)
        assert book.verify() == []


def test_threads_sharing_one_ledger_are_serialised(target: Target) -> None:
    _fund(target)
    successes = [0] * THREADS
    with target.open() as book:

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


def test_connections_opening_a_fresh_file_at_once_migrate_once(target: Target) -> None:
    barrier = threading.Barrier(THREADS)

    def opener(index: int) -> None:
        barrier.wait()
        with target.open() as book:
            book.open_account("shared")
            book.allocate("shared", 1, idempotency_key="once")

    _run_threads(opener, THREADS)
    with target.open() as book:
        assert book.balance("shared").balance == 1
        assert book.verify() == []


# -- processes -------------------------------------------------------------------

RACER = """
import sys
from ledger import InsufficientCredits, open_ledger
with open_ledger(sys.argv[1]) as book:
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


def _race(procs: list[subprocess.Popen[str]]) -> list[str]:
    """Start racers together (each has its connection open first); their last lines."""
    try:
        for proc in procs:  # every racer has its connection open
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:  # then all go at once
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outs = []
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0
            outs.append(out.strip().splitlines()[-1])
        return outs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_processes_racing_reservations_never_overspend(target: Target) -> None:
    _fund(target)
    wins = [
        int(line)
        for line in _race([_spawn(RACER, target.url, ATTEMPTS, AMOUNT, f"p{i}") for i in range(4)])
    ]
    assert sum(wins) * AMOUNT <= BALANCE
    assert sum(wins) == min(BALANCE // AMOUNT, 4 * ATTEMPTS)
    with target.open() as book:
        assert book.balance("alice").reserved == sum(wins) * AMOUNT
        assert book.verify() == []


HAMMER = """
import random, sys
from ledger import InsufficientCredits, open_ledger
url, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
with open_ledger(url) as book:
    print("ready", flush=True)
    sys.stdin.readline()
    charged = reserved = refused = 0
    for n in range(rounds):
        if n % 25 == 0:  # every process replays the same grants: each lands once
            book.allocate("alice", 100, idempotency_key=f"grant-{n // 25}")
        try:
            res = book.reserve("alice", rng.randint(0, 60), holder=f"p{seed}")
        except InsufficientCredits as exc:
            assert exc.available < exc.needed
            refused += 1
            continue
        reserved += 1
        if rng.random() < 0.3:
            book.release(res.id)
        else:
            charged += book.settle(res.id, rng.randint(0, 80), model_id="m").charged
    print(charged, reserved, refused, flush=True)
"""


def test_processes_hammering_one_account_lose_nothing(target: Target) -> None:
    """Several OS processes reserve, settle, release and replay grants on one account."""
    _fund(target, 300)
    rounds = 200
    grants = rounds // 25
    lines = _race([_spawn(HAMMER, target.url, seed, rounds) for seed in range(4)])
    charged = sum(int(line.split()[0]) for line in lines)
    assert sum(int(line.split()[1]) for line in lines) > 0
    with target.open() as book:
        stats = book.statistics()
        # Idempotent across processes: each distinct grant allocated once.
        assert stats.allocations_total == 300 + grants * 100
        assert stats.charges_total == charged
        left = 300 + grants * 100 - charged
        assert book.balance("alice") == Balance("alice", left, 0, left)
        assert book.open_reservations() == []
        assert sum(book.usage_by_model("alice").values()) == charged
        assert book.verify() == []


# -- crash recovery ----------------------------------------------------------------

KILLED_HOLDING = """
import os, signal, sys
from ledger import open_ledger
book = open_ledger(sys.argv[1])
res = book.reserve("alice", 300, model_id="m", streaming_session_id="s", holder="A")
print(res.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

KILLED_MID_TRANSACTION_SQLITE = """
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

KILLED_MID_TRANSACTION_POSTGRES = """
import os, signal, sys
import psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
conn.execute("BEGIN")
conn.execute("UPDATE ledger_accounts SET balance = balance + 5000")
conn.execute(
    "INSERT INTO ledger_entries (account_id, kind, amount, created_at)"
    " VALUES ('alice', 'allocation', 5000, 'x')"
)
print("written", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _run_until_killed(code: str, target: Target) -> str:
    proc = _spawn(code, target.url)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return out.strip()


def test_recover_after_a_killed_process(target: Target) -> None:
    _fund(target)
    reservation_id = _run_until_killed(KILLED_HOLDING, target)
    with target.open() as book:
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


def test_recover_spares_the_live_holder(target: Target) -> None:
    _fund(target)
    dead = target.open()
    dead.reserve("alice", 300, holder="A")
    dead.close()  # closed without settling: its process is "gone"
    with target.open() as live:
        mine = live.reserve("alice", 100, holder="B")
        assert live.recover(holder="B") == 1
        assert live.open_reservations() == [mine]
        assert live.recover(holder="B") == 0
        assert live.balance("alice") == Balance("alice", BALANCE, 100, BALANCE - 100)
        live.settle(mine.id, 40)
        assert live.balance("alice") == Balance("alice", BALANCE - 40, 0, BALANCE - 40)
        assert live.verify() == []


def test_a_transaction_cut_by_a_kill_leaves_nothing(target: Target) -> None:
    _fund(target)
    script = (
        KILLED_MID_TRANSACTION_SQLITE
        if target.backend == "sqlite"
        else KILLED_MID_TRANSACTION_POSTGRES
    )
    assert _run_until_killed(script, target) == "written"
    with target.open() as book:
        assert book.balance("alice") == Balance("alice", BALANCE, 0, BALANCE)
        assert book.entries("alice")[1] == 1
        assert book.verify() == []
