"""`python -m bench.ab BEFORE [--rounds N] [--write NAME] -- BENCH-ARGS`: a change, side by
side.

Runs the bench (`python -m bench BENCH-ARGS`) on revision BEFORE, checked out in a temporary
git worktree, and on this working tree, alternating (before, after, before, after, ...) so
that both sides meet the same machine: a shared machine's speed drifts by more than most
changes are worth (bench/RESULTS.md saw 2× between two days). Prints each figure of every
round, the median of each side and after/before; `--write NAME` also writes it to
bench/ab/NAME.md.

Figures are read from the tables the bench prints, so BEFORE may be any revision whose bench
prints them (its own code, migrations and bench run on its side).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import PROJECT_ROOT, progress

OUTPUT_DIR = PROJECT_ROOT / "bench" / "ab"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
LOADGEN = re.compile(r"loadgen (\d+(?:\.\d+)?)")
# Latency rows: the columns compared (found by their header), and their names here.
LATENCY_COLUMNS = {"p50": "p50 ms", "p99": "p99 ms", "achieved": "achieved"}


@dataclass
class Side:
    label: str
    directory: Path
    rounds: list[dict[str, str]] = field(default_factory=list)  # figure -> value, per round


def figures(stdout: str) -> dict[str, str]:
    """Every figure of a bench run's tables, keyed by what it is."""
    found: dict[str, str] = {}
    table = ""
    header: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("### "):
            table = line[4:].strip()
            continue
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "scenario":
            header = cells
            continue
        if table.startswith("Latency") and len(cells) == len(header):
            for column, name in LATENCY_COLUMNS.items():
                if column in header:
                    found[f"{cells[0]} · {cells[1]} · {cells[2]} · {name}"] = \
                        cells[header.index(column)]
            if generator := LOADGEN.search(cells[-1]):  # the CPU column: the generators'
                found[f"{cells[0]} · {cells[1]} · {cells[2]} · loadgen cores"] = generator[1]
        elif table == "Figures" and len(cells) > 2:
            found[f"{cells[0]} · {cells[1]}"] = cells[2]
    return found


def first_number(value: str) -> float | None:
    match = NUMBER.search(value.replace(",", ""))
    return float(match.group()) if match else None


def run_bench(side: Side, bench_args: list[str], name: str) -> dict[str, str]:
    progress(f"--- {side.label}: python -m bench {' '.join(bench_args)}")
    done = subprocess.run([sys.executable, "-m", "bench", *bench_args, "--name", name],
                          cwd=side.directory, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the bench failed on the {side.label} side (exit "
                         f"{done.returncode}); its log is on stderr above")
    return figures(done.stdout)


def table(before: Side, after: Side) -> str:
    keys = list(dict.fromkeys(k for r in after.rounds + before.rounds for k in r))
    rounds = len(after.rounds)
    out = ["| figure | " + " | ".join(f"before {i + 1}" for i in range(rounds)) + " | "
           + " | ".join(f"after {i + 1}" for i in range(rounds))
           + " | before (median) | after (median) | after / before |",
           "|---|" + "--:|" * (2 * rounds + 3)]
    for key in keys:
        cells = [r.get(key, "") for r in before.rounds] + [r.get(key, "") for r in after.rounds]
        medians = []
        for side in (before, after):
            numbers = [n for r in side.rounds if (n := first_number(r.get(key, ""))) is not None]
            medians.append(statistics.median(numbers) if numbers else None)
        ratio = (f"{medians[1] / medians[0]:.3g}×" if medians[0] and medians[1] is not None
                 else "")
        shown = [f"{m:.4g}" if m is not None else "" for m in medians]
        out.append(f"| {key} | " + " | ".join(cells) + f" | {shown[0]} | {shown[1]} | {ratio} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="the revision to compare against (e.g. HEAD~1)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side (default 2)")
    parser.add_argument("--write", metavar="NAME",
                        help="also write it to bench/ab/NAME.md (NAME: what the change is)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    bench_args = argv[split + 1:]  # after `--`: the bench's own (e.g. --only jobs)
    if "--write-results" in bench_args or "--name" in bench_args:
        parser.error("--write-results and --name are the harness's to set")

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=PROJECT_ROOT, check=True, text=True,
                              stdout=subprocess.PIPE).stdout.strip()

    revision = git("rev-parse", "--short", args.before)
    head = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with tempfile.TemporaryDirectory(prefix="ferry-ab-") as tmp:
        worktree = Path(tmp) / "before"
        git("worktree", "add", "--detach", str(worktree), revision)
        try:
            before = Side(f"before ({revision})", worktree)
            after = Side(f"after ({head}{' + uncommitted changes' if dirty else ''})",
                         PROJECT_ROOT)
            for i in range(args.rounds):
                progress(f"=== round {i + 1} of {args.rounds}")
                before.rounds.append(run_bench(before, bench_args, "ferry_bench_before"))
                after.rounds.append(run_bench(after, bench_args, "ferry_bench_after"))
        finally:
            git("worktree", "remove", "--force", str(worktree))
    text = (f"# A change, side by side\n\nWritten by `python -m bench.ab {args.before} "
            f"--rounds {args.rounds}{f' --write {args.write}' if args.write else ''} -- "
            f"{' '.join(bench_args)}`.\n\n"
            f"- date: {started}\n- before: {before.label}\n- after: {after.label}\n"
            f"- order: before, after, alternating, {args.rounds} rounds each; the medians "
            "are of the rounds (the first number of each cell)\n\n" + table(before, after))
    print(text, flush=True)
    if args.write:
        OUTPUT_DIR.mkdir(exist_ok=True)
        path = OUTPUT_DIR / f"{args.write}.md"
        path.write_text(text)
        progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
