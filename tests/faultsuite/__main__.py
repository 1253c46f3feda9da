"""``make faults``: ``python -m tests.faultsuite [--producers K] [--load S] [--hold S] [--faults a,b]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tests.faultsuite.harness import FAULTS, Options, run_faults


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--producers", type=int, default=12)
    parser.add_argument(
        "--load", type=float, default=10.0, help="seconds of full-speed appends between faults"
    )
    parser.add_argument("--hold", type=float, default=8.0, help="seconds each stall or outage lasts")
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated, from {','.join(FAULTS)}"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the stack and logs here")
    args = parser.parse_args()
    faults = tuple(f for f in args.faults.split(",") if f)
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}")
    started = time.monotonic()
    report = run_faults(
        Options(
            producers=args.producers,
            load_seconds=args.load,
            hold_seconds=args.hold,
            faults=faults,
            data_dir=args.data_dir,
            log=lambda line: print(line, flush=True),
        )
    )
    print(report.table())
    print(f"fault run took {time.monotonic() - started:.0f} s")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
