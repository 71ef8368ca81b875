"""`convlens demo` end to end (issue 8's acceptance: within 5 minutes on 2 CPU cores, no download); with --real,
`convlens demo --real` against its 10-minute budget (issue 22).

Runs the real CLI in a subprocess into a fresh folder and prints the wall time against the 5-minute budget, the
seconds of every step (from pipeline.json), and two ratios measured in the same run: the wall time against the
sum of the steps' own seconds (what the orchestration, the report and the process start add), and a second run
of the same command, which must skip every step, against the first (the cost of deciding that nothing is left).

    python benchmarks/demo.py [--real] [--threads 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_SECONDS = {False: 300.0, True: 600.0}
REAL_RUNS = ("photos", "fashion-mnist")


def timed_demo(out: Path, env: dict[str, str], real: bool) -> tuple[float, str]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "convlens", "demo", "--out", str(out), *(["--real"] if real else [])]
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        sys.exit(f"convlens demo failed:\n{finished.stdout[-2000:]}\n{finished.stderr[-2000:]}")
    return seconds, finished.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the budget is for 2 cores)")
    parser.add_argument("--keep", default=None, help="write the run here instead of a temporary folder")
    parser.add_argument("--real", action="store_true", help="time `convlens demo --real` (10-minute budget)")
    args = parser.parse_args()
    budget = BUDGET_SECONDS[args.real]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.keep or Path(scratch) / "demo")
        first, summary = timed_demo(out, env, args.real)
        folders = [out / run for run in REAL_RUNS] if args.real else [out]
        steps = [step for folder in folders for step in json.loads((folder / "pipeline.json").read_text())["steps"]]
        again, rerun = timed_demo(out, env, args.real)
    step_seconds = sum(step["seconds"] or 0.0 for step in steps)
    width = max(len(step["name"]) for step in steps)
    for step in steps:
        print(f"  {step['name']:<{width}}  {step['seconds']:7.1f} s")
    print(summary)
    print(
        f"demo: {first:.1f} s wall = {first / budget:.2f} x the {budget / 60:.0f}-minute budget "
        f"({'within' if first <= budget else 'OVER'}); steps {step_seconds:.1f} s, so wall / steps = "
        f"{first / step_seconds:.2f} (process start, model checks, report)"
    )
    print(f"rerun with every step done: {again:.1f} s = {again / first:.3f} x the first run ({rerun})")


if __name__ == "__main__":
    main()
