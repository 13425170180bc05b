"""`make fuzz`: run the property tests (tests/test_properties.py) with fresh seeds for a wall-clock budget.

Hypothesis has no time budget, so this runs the tests in rounds of a bounded number of examples under
the ``fuzz`` profile (random seed per round, no deadline, no example database) until the time is up,
keeps going after a failure (each one is printed with its falsifying example and a
``@reproduce_failure`` blob), and ends with the figures: examples tried per test, failures found.
Exit status 1 when anything failed.

    python -m tests.fuzz --minutes 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ["HYPOTHESIS_PROFILE"] = "fuzz"

from hypothesis import settings  # noqa: E402

import tests.conftest  # noqa: E402,F401 - registers and loads the profiles
from tests import test_properties as props  # noqa: E402

# (test, its counter in props.COUNTS, examples per round)
TESTS = (
    (props.test_optimize_plans_and_rewrites_per_spec, "structure", 300),
    (props.test_optimized_ranks_run_bit_identical, "runtime", 100),
    (props.test_runtime_loads_what_onnxruntime_loads_with_identity, "shapes", 200),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget (default 10)")
    args = parser.parse_args(argv)
    for test, _, per_round in TESTS:
        # Each call of a round-bounded test draws fresh examples (random seed, no database).
        settings(parent=settings.get_profile("fuzz"), max_examples=per_round)(test)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    failures: list[tuple[str, str]] = []
    rounds = 0
    while time.monotonic() < deadline:
        for test, key, per_round in TESTS:
            if time.monotonic() >= deadline:
                break
            rounds += 1
            try:
                test()
            except Exception as exc:  # noqa: BLE001 - report every failure and go on fuzzing
                where = traceback.extract_tb(exc.__traceback__)[-1]
                signature = (
                    f"{type(exc).__name__} at {os.path.basename(where.filename)}:{where.lineno}: "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                )
                failures.append((test.__name__, signature))
                print(f"\n=== FAILURE in {test.__name__}: {signature}", flush=True)
                traceback.print_exception(exc, limit=-4)
                for line in getattr(exc, "__notes__", []):
                    print(line)
                sys.stdout.flush()
        elapsed = time.monotonic() - start
        tried = ", ".join(f"{k} {v}" for k, v in props.COUNTS.items())
        print(f"[{elapsed / 60:5.1f} min] examples: {tried}; failures: {len(failures)}", flush=True)
    distinct = sorted(set(failures))
    print(
        f"\nfuzz: {(time.monotonic() - start) / 60:.1f} min, {rounds} rounds, examples tried: "
        + ", ".join(f"{k} {v}" for k, v in props.COUNTS.items())
        + f" (total {sum(props.COUNTS.values())}); failures: {len(failures)} ({len(distinct)} distinct)"
    )
    for name, signature in distinct:
        print(f"  {name}: {signature}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
