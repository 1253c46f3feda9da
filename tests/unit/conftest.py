"""Unit tests: pure logic, no services. Nothing here may request the stack fixtures of
``tests/conftest.py`` (they start only when a test asks for them).

Hypothesis runs a modest number of examples so the whole directory stays well under ten seconds,
with no per-example deadline (a loaded CI machine must not turn a slow example into a failure).
Set ``HYPOTHESIS_PROFILE=thorough`` for a longer search.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "unit", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "unit"))
