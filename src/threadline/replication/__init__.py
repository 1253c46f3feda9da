"""Logical replication of the Postgres ``sessions`` table into ClickHouse ``sessions_v1``.

Names shared by the consumer (which creates them) and readers of its progress.
"""

PUBLICATION = "threadline_sessions"
SLOT = "threadline_sessions_v1"
