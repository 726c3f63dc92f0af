"""Run the benchmarks and write their figures to docs/PERFORMANCE.md.

    python -m bench.report [--quick] bench.bench_classifiers bench.bench_sentiment ...

Each benchmark module prints one JSON line per figure (see bench.common.emit); this collects them in one table with
the date, device, versions and commit, so the document always says where its numbers came from.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import PROJECT_ROOT, environment

TABLE_START, TABLE_END = "<!-- bench table: written by bench/report.py -->", "<!-- end of bench table -->"


def run_benchmark(module: str, quick: bool) -> tuple[list[dict[str, object]], dict[str, str] | None]:
    command = [sys.executable, "-m", module] + (["--quick"] if quick else [])
    completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    sys.stderr.write(completed.stderr[-4000:])
    if completed.returncode != 0:
        raise SystemExit(f"{module} failed with exit code {completed.returncode}")
    return figures_in(completed.stdout, module.rsplit(".", 1)[-1])


def figures_in(output: str, bench: str) -> tuple[list[dict[str, object]], dict[str, str] | None]:
    """The figures of one benchmark's JSON lines, and the environment line it printed first."""
    figures, header = [], None
    for line in output.splitlines():
        if line.startswith("{"):
            print(line, flush=True)
            record = json.loads(line)
            if "figure" in record:
                figures.append({"bench": bench, **record})
            header = record.get("environment", header)
    return figures, header


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def markdown(figures: list[dict[str, object]], header: dict[str, str], quick: bool, commits: dict[str, str] | None = None) -> str:
    """The table; `commits` (bench -> commit) where the benchmarks ran at different commits (saved device runs)."""
    if commits and len(set(commits.values())) > 1:
        commit = ", ".join(f"`{sha}` ({bench})" for bench, sha in commits.items())
    else:
        commit = f"`{header['commit']}`"
    lines = [
        "# Performance",
        "",
        f"Latest run: {header['date']} on **{header['device']}**, commit {commit}, torch {header['torch']}, "
        f"transformers {header['transformers']}, diffusers {header['diffusers']}{' (quick, reduced sizes)' if quick else ''}.",
        "Full-size architectures with random weights (speed and memory do not depend on weight values). "
        "`naive` is the tutorial way (fp32, one item per call); `ours` is the app's core path, timed in the same process. "
        "`ratio` is how many times better ours is.",
        "",
        "| bench | figure | naive | ours | unit | ratio | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for figure in figures:
        notes = {k: v for k, v in figure.items() if k not in {"bench", "figure", "naive", "ours", "unit", "ratio"}}
        lines.append(
            f"| {figure['bench']} | {figure['figure']} | {_cell(figure['naive'])} | {_cell(figure['ours'])} | {figure['unit']} "
            f"| {_cell(figure['ratio'])} | {', '.join(f'{k}={_cell(v)}' for k, v in notes.items())} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", help="benchmark modules to run, or with --from-json their saved output files (<bench>.jsonl)")
    parser.add_argument("--quick", action="store_true", help="reduced sizes, for a CPU")
    parser.add_argument("--from-json", action="store_true", help="build the table from saved outputs (runs made on the GPU machine)")
    parser.add_argument("--output", default=str(PROJECT_ROOT / "docs" / "PERFORMANCE.md"))
    args = parser.parse_args()
    if args.from_json:
        runs = [figures_in(Path(name).read_text(), Path(name).stem) for name in args.modules]
    else:
        runs = [run_benchmark(module, args.quick) for module in args.modules]
    figures = [figure for run_figures, _ in runs for figure in run_figures]
    headers = [header for _, header in runs if header]
    commits = {run_figures[0]["bench"]: header["commit"] for run_figures, header in runs if header and run_figures}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_table(Path(args.output), markdown(figures, headers[0] if headers else environment(device), args.quick, commits))


def write_table(path: Path, table: str) -> None:
    """Replace the generated part of `path` (between the markers), keeping the notes written around it."""
    old = path.read_text() if path.exists() else ""
    if TABLE_START in old and TABLE_END in old:
        before, rest = old.split(TABLE_START, 1)
        table = before + TABLE_START + "\n" + table.removeprefix("# Performance\n\n") + TABLE_END + rest.split(TABLE_END, 1)[1]
    path.write_text(table)


if __name__ == "__main__":
    main()
