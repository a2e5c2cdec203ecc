"""The `peft-ext` command.

    peft-ext tour [--out DIR] [--only nola,...]   run every method end to end on embedded defaults
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from peft_ext.tour import STAGES

    parser = argparse.ArgumentParser(prog="peft-ext", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tour = commands.add_parser("tour", help="run every method end to end on embedded defaults (CPU, minutes)")
    tour.add_argument("--out", default="peft_ext_tour", help="folder for report.md and plots (default: %(default)s)")
    tour.add_argument("--only", default=None,
                      help=f"comma-separated subset of the stages {','.join(STAGES)} (default: all)")
    args = parser.parse_args(argv)

    if args.command == "tour":
        from peft_ext.tour import run_tour

        only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
        try:
            report = run_tour(args.out, only)
        except ValueError as err:
            parser.error(str(err))
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
