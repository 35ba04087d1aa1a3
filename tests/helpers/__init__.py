"""What several test files share (tests import it as `helpers`: pytest puts tests/ on the path, and the fixtures
that let CLI runs load helpers.inject put it on theirs). Fixtures are in conftest.py."""

from helpers.grads import assert_same_weights, outputs_and_grads
from helpers.runs import (
    CONF,
    EXACT,
    ONE_EPOCH,
    ROOT,
    SGD,
    TINY,
    assert_one_line_error,
    cli,
    cli_env,
    error_lines,
    rank_lines,
    run_cli,
    run_main,
)
from helpers.scripts import TINY_BENCH, run_bench

__all__ = [
    "CONF",
    "EXACT",
    "ONE_EPOCH",
    "ROOT",
    "SGD",
    "TINY",
    "TINY_BENCH",
    "assert_one_line_error",
    "assert_same_weights",
    "cli",
    "cli_env",
    "error_lines",
    "outputs_and_grads",
    "rank_lines",
    "run_bench",
    "run_cli",
    "run_main",
]
