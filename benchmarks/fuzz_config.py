"""Fuzz the config loader longer than the test suite does (issue 14 item 5): random YAML
structures from the real key names with junk values, each must load or raise the project's
UserError. Prints the count of examples, how many loaded / were refused, and any other exception.

    python benchmarks/fuzz_config.py [--examples 5000] [--seed 0]
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests.test_fuzz_config import check, configs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    counts: collections.Counter = collections.Counter()
    escaped: list[str] = []

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(configs)
    def one(raw):
        try:
            counts[check(raw)] += 1
        except Exception as e:  # the finding: not a UserError
            counts["other exception"] += 1
            escaped.append(f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''} <- {raw!r:.200}")

    t0 = time.perf_counter()
    one()
    total = sum(counts.values())
    print(f"{total} examples in {time.perf_counter() - t0:.0f}s: {counts['valid']} valid configs, "
          f"{counts['error']} refused with a ConfigError/UserError, {counts['other exception']} other exceptions")
    for line in escaped[:20]:
        print("  ", line)
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
