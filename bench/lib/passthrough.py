"""Command lines of the bench helpers: their own options, then `--` and the
arguments they pass on to the program they run."""

import sys


def parse(ap):
    """Parses sys.argv with `ap` up to `--`; returns (args, what follows `--`)."""
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    return ap.parse_args(argv), extra
