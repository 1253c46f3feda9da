"""The fault suite: real processes, real faults, and a checker (``make faults``; docs/deployment.md).

``harness`` runs the embedded stack and two ``threadline serve`` processes and injects faults,
``producers`` appends at full speed with idempotent-producer headers and records every answer,
``checker`` proves the durability promises from what the producers saw and what is stored, and
``mirror`` compares Postgres sessions with their ClickHouse copy.
"""
