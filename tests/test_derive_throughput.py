"""benchmarks/derive_throughput.py: repeated runs rotate their order, so no run is always first."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from derive_throughput import interleaved_times  # noqa: E402


def test_repeats_rotate_which_run_goes_first_and_keep_each_runs_times():
    order: list[str] = []
    seconds = iter(range(1, 100))

    def run(name: str):
        def timed() -> float:
            order.append(name)
            return float(next(seconds))

        return timed

    times = interleaved_times({name: run(name) for name in ("fp32", "default", "trainer")}, repeats=3)
    assert order == ["fp32", "default", "trainer", "default", "trainer", "fp32", "trainer", "fp32", "default"]
    assert times == {"fp32": [1.0, 6.0, 8.0], "default": [2.0, 4.0, 9.0], "trainer": [3.0, 5.0, 7.0]}
