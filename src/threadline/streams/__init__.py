"""Durable streams: the storage engine behind session channels and the Durable Streams protocol.

names.py      stream names, session channel names, content types
offsets.py    the opaque offset format
records.py    how records are laid out in objects (blobs) and JSON mode
heads.py      stream rows in Postgres: create, look up, delete, TTL
committer.py  group commit: many appends, many streams, one object PUT + one transaction
producers.py  idempotent producer decisions
reader.py     reads from the chunk index and the object store, through a byte cache
cache.py      the shared chunk cache (single flight)
live.py       wake-ups for live readers: in-process, and LISTEN/NOTIFY across instances
activity.py   sessions' lastActiveAt, at most one write per second per session
compactor.py  a stream's small chunks in shared batch objects -> one per-stream segment
collector.py  expired streams, unreferenced objects, orphan objects
maintenance.py  the leader-locked loop that runs the compactor and the collector
engine.py     the per-instance object that owns all of the above
"""
