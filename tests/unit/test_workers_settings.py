"""The worker count: its setting and the serve/dev flags."""

from __future__ import annotations

import os

import pytest


def test_workers_setting_defaults_to_one_per_cpu() -> None:
    from threadline.config import Settings
    from threadline.workers import worker_count

    assert Settings.model_fields["workers"].default == 0
    assert worker_count(0) == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


def test_serve_and_dev_take_workers() -> None:
    from threadline.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--workers", "2"]).workers == 2
    assert parser.parse_args(["serve"]).workers is None
    assert parser.parse_args(["dev", "--workers", "0"]).workers == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--workers", "-1"])
