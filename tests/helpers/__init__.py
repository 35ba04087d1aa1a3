"""What several test files share (tests import it as `helpers`: pytest puts tests/ on the path, and the fixtures
that let CLI runs load helpers.inject put it on theirs). Fixtures are in conftest.py."""

from helpers.grads import outputs_and_grads
from helpers.runs import CONF, ROOT, TINY, assert_one_line_error, rank_lines, run_cli, run_main
from helpers.scripts import TINY_BENCH, run_bench

__all__ = [
    "CONF",
    "ROOT",
    "TINY",
    "TINY_BENCH",
    "assert_one_line_error",
    "outputs_and_grads",
    "rank_lines",
    "run_bench",
    "run_cli",
    "run_main",
]
