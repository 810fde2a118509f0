"""2,000 fuzzed requests through Envoy: no INTERNAL or UNKNOWN, no crash, memory back, a good stream unharmed.

`make fuzz` runs the same fuzzer with 20,000 requests against a mesh of its own.
"""

from __future__ import annotations

from services.fuzz import ALLOWED, GOOD_TOLERANCE, run_fuzz

REQUESTS = 2000


def test_fuzzed_requests_are_answered_cleanly(mesh, envoy_address):
    report = run_fuzz(envoy_address, requests=REQUESTS, seed=20251202, processes=mesh.processes, shrink_budget=200)
    print("\n" + report.format())
    assert report.requests >= REQUESTS or report.crashes, "the fuzz stopped early"
    problems = report.problems()
    assert not problems, "\n".join(problems)
    # what problems() promises, spelled out
    assert set(report.counts) <= ALLOWED | {"UNAVAILABLE"}
    assert report.good_runs >= 1 and not report.good_mismatches
    assert report.good_max_difference < GOOD_TOLERANCE
