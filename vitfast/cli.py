"""`vitfast` command line: `vitfast bench ...`."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"bench": "vitfast.bench"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: vitfast {" + ",".join(commands) + "} [options]\n"
              "  bench    benchmark sweep over patch sizes")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])
