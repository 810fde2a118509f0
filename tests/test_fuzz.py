"""300 fuzzed requests through Envoy: no INTERNAL or UNKNOWN, no crash, memory back, a good stream unharmed.

`make fuzz` runs the same fuzzer with 20,000 requests against a mesh of its own.
"""

from __future__ import annotations

import pytest

from services.fuzz import ALLOWED, GOOD_TOLERANCE, Generator, Report, Seeds, run_fuzz
from services.synthesis.voice_cache import CACHE_BYTES

REQUESTS = 300
FULL_RUN_SEED = 20251202  # `make fuzz`'s default seed


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


# `make fuzz`'s run, and a seed whose mutated script named a speaker past uint32 for one of its voices
@pytest.mark.parametrize(("seed", "requests"), [(FULL_RUN_SEED, 20_000), (20261212, 6_000)])
def test_the_generator_makes_every_case_of_a_full_run(seed, requests):
    """A fuzz run's cases must each be a request, whatever mutations came before it."""
    seeds = Seeds.load(seed=seed)
    generator = Generator(seeds, seed)
    cases = [generator.case(i) for i in range(requests)]
    assert all(isinstance(c.payload, bytes) for c in cases)
    assert len({c.family.split(".")[0] for c in cases}) > 5  # every kind of mutation was drawn


def test_memory_may_grow_by_a_bounded_cache_and_no_more():
    """The gateway keeps decoded voices up to CACHE_BYTES, and the fuzz's mutated voices are many distinct files:
    that growth is allowed to the gateway, not to a service without such a cache, and not beyond the bound."""
    mib = 2**20

    def problems(name: str, before: int, after: int) -> list[str]:
        report = Report(good_runs=1)
        report.rss_before, report.rss_after = {name: before}, {name: after}
        return [p for p in report.problems() if "RSS" in p]

    assert not problems("gateway", 350 * mib, 350 * mib + CACHE_BYTES)
    assert problems("gateway", 350 * mib, 350 * mib + 35 * mib + CACHE_BYTES + mib)
    assert problems("llm", 350 * mib, 350 * mib + 40 * mib)
    assert problems("gateway", 350 * mib, 300 * mib)  # a drop past the tolerance is still reported
