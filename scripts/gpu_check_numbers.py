#!/usr/bin/env python
"""The key numbers of a gpu_check.sh step, one line for its report, read from what the step wrote.

    python scripts/gpu_check_numbers.py run RUN_DIR          # a training run: status, val/ppl, tokens/sec
    python scripts/gpu_check_numbers.py bench BENCH_JSON     # bench.py --json: training tokens/sec, smallest shape
    python scripts/gpu_check_numbers.py framework JSON       # bench_framework.py --json: the ratios through Lightning
    python scripts/gpu_check_numbers.py graphs JSON          # bench_graphs.py --json: graph/eager tokens/s and MFU

Here and not in the shell script, so that a CPU machine tests them on files made the same way (the GPU steps
themselves only run where there is a GPU).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def run_line(run_dir: Path) -> str:
    """'completed: val/ppl 10.443, 172,485 tokens/sec, world_size 1' from a run's summary.json."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return "no summary.json"
    s = json.loads(path.read_text())
    val, rate = s.get("val_ppl", math.nan), s.get("tokens_per_sec", math.nan)
    return f"{s.get('status')}: val/ppl {val:.3f}, {rate:,.0f} tokens/sec, world_size {s.get('world_size')}"


def bench_line(report: dict) -> str:
    """Every variant's training tokens/sec at the smallest shape, and the GEMM rate."""
    rows = [r for r in report["results"] if r["mode"] == "train"]
    B, H = min((r["batch"], r["hidden"]) for r in rows)
    rates = ", ".join(f"{r['variant']} {r['tokens_per_sec']:,.0f}" for r in rows if (r["batch"], r["hidden"]) == (B, H))
    return f"train B{B} H{H} tokens/sec: {rates}; GEMM {report['gemm_gflops']:,.0f} GFLOP/s"


def framework_line(report: dict) -> str:
    """Per variant and shape: framework/bare, and its split into floor/bare (Lightning's) and framework/floor."""
    return "; ".join(
        f"{r['variant']} B{r['batch']} H{r['hidden']}: framework/bare {r['framework/bare']:.3f} "
        f"(floor/bare {r['floor/bare']:.3f}, framework/floor {r['framework/floor']:.3f})"
        for r in report["framework"]
    )


def graphs_line(report: dict) -> str:
    """Per variant and shape: eager -> graph tokens/s and MFU, graph/eager against its target; a fallback named."""

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    label, parts = report["graph_label"], []
    for r in report["ratios"]:
        ratio, target = r["graph/eager"], r.get("target graph/eager")
        part = (
            f"{r['variant']} B{r['batch']} H{r['hidden']}: {num(r['eager_tokens_per_sec'], ',.0f')} -> "
            f"{num(r['graph_tokens_per_sec'], ',.0f')} tokens/sec, {label}/eager {num(ratio, '.2f')}"
        )
        if target is not None:
            part += f" ({'ok' if ratio is not None and ratio >= target else 'below'} {target:g})"
        if r["eager_mfu"] is not None or r["graph_mfu"] is not None:
            part += f", MFU {num(r['eager_mfu'], '.4f')} -> {num(r['graph_mfu'], '.4f')}"
        parts.append(part)
    fell_back = [f"{r['variant']} B{r['batch']} H{r['hidden']}" for r in report["runs"] if r["fallback"]]
    if fell_back:
        parts.append(f"eager fallback in: {', '.join(fell_back)}")
    return "; ".join(parts)


def main(argv: list[str]) -> int:
    kinds = {"bench": bench_line, "framework": framework_line, "graphs": graphs_line}
    if len(argv) != 2 or argv[0] not in ("run", *kinds):
        print(
            "usage: gpu_check_numbers.py run RUN_DIR | bench BENCH_JSON | framework FRAMEWORK_JSON | graphs JSON",
            file=sys.stderr,
        )
        return 2
    kind, path = argv[0], Path(argv[1])
    if kind == "run":
        print(run_line(path))
    else:
        print(kinds[kind](json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
