"""The thread machinery: BLAS thread count restored, profile shares exclusive and complete."""
import time

import numpy as np
import pytest

from nanoternary import parallel, profile


def test_run_shards_restores_blas_threads_even_when_a_shard_fails():
    ctl = parallel.blas_control()
    if ctl is None:
        pytest.skip("no BLAS thread control here: shards run in one thread")
    setter, getter = ctl
    before = getter()
    assert parallel.run_shards(lambda a, b: getter(), [(0, 1), (1, 2)]) == [1, 1]
    assert getter() == before

    def boom(a, b):
        if a == 0:
            raise RuntimeError("shard 0 failed")
        time.sleep(0.05)
        return a
    with pytest.raises(RuntimeError, match="shard 0 failed"):
        parallel.run_shards(boom, [(0, 1), (1, 2)])
    assert getter() == before


def test_parallel_ranges_covers_every_index_once():
    seen = np.zeros(3_000_001, dtype=np.int64)

    def mark(lo, hi):
        seen[lo:hi] += 1
    parallel.parallel_ranges(mark, seen.size)
    assert (seen == 1).all()


def test_profile_sections_are_exclusive_and_reach_worker_threads():
    """Nested time is charged to the inner section only; workers' time to the section that started
    them. Only lower bounds on sleeps and one wide margin: nothing here depends on the machine's speed."""
    profile.enable(True)
    profile.reset()
    try:
        with profile.section("outer"):
            time.sleep(0.02)
            with profile.section("inner"):
                time.sleep(0.5)
            parallel.parallel_ranges(lambda lo, hi: time.sleep(0.03), 2 << 20)
    finally:
        profile.enable(False)
    t = profile.times()
    workers = parallel.default_workers()
    assert t["inner"] >= 0.5
    assert t["outer"] >= 0.02 + 0.03 * workers - 1e-3        # its own sleep plus every worker's
    assert t["outer"] < 0.02 + 0.03 * workers + 0.45          # and not the inner 0.5 s
    assert abs(sum(profile.shares().values()) - 1.0) < 1e-9
