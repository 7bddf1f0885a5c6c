"""Cluster mode (SPEC §9): what several chinwag processes share through Redis.

Unset ``CHINWAG_REDIS_URL`` and nothing here is used. Modules, one concept each::

    redis.py      open_redis, ClusterRedis (client, key prefix, error boundary), ClusterUnavailable
    claims.py     Claims (one stream per chat session + the per-user cap), RateLimiter
    registry.py   Registry: which incarnation runs which stream; the cluster's live list
    nodes.py      Identity, Node: leases, renewal, exactly-once recovery of a dead node's streams
    publisher.py  Publisher: every live stream's events into Redis, one pipeline per wake-up
    mirror.py     Mirror: a remote stream into a local ring, one reader per stream per node
    signals.py    Signals: stop / end-session / shutdown to the stream's node, answer awaited
    watch.py      StreamWatch: a session's stream for its observers, wherever it runs (?wait=)
    cluster.py    Cluster, open_cluster: all of it for one process, run as one service
    bench.py      ``python -m server.cluster.bench``: XADD round trip and pipelined rates

Every call that needs Redis raises :class:`ClusterUnavailable` when it is
not there (the server answers 503 with ``Retry-After``).
"""

from .claims import Admission as Admission
from .claims import ClaimRefused as ClaimRefused
from .claims import Claims as Claims
from .claims import RateLimiter as RateLimiter
from .claims import SessionBusy as SessionBusy
from .claims import UserAtCap as UserAtCap
from .cluster import Cluster as Cluster
from .cluster import open_cluster as open_cluster
from .mirror import GAP as GAP
from .mirror import Mirror as Mirror
from .mirror import mirror_encoder as mirror_encoder
from .nodes import Identity as Identity
from .nodes import Node as Node
from .nodes import RecoveredStream as RecoveredStream
from .publisher import Publisher as Publisher
from .redis import ClusterRedis as ClusterRedis
from .redis import ClusterUnavailable as ClusterUnavailable
from .redis import open_redis as open_redis
from .registry import ActiveStream as ActiveStream
from .registry import NodeLost as NodeLost
from .registry import Registry as Registry
from .registry import StreamInfo as StreamInfo
from .signals import Signals as Signals
