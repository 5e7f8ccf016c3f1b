"""`vitfast` command line. Each command lives in its own module with a `main(argv) -> int`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "bench": ("vitfast.bench", "benchmark sweep over patch sizes (the O(n^2) study)"),
    "tune": ("vitfast.tuning", "tune every shape of a model ahead of time (kept on disk per GPU and versions)"),
    "smoke": ("vitfast.smoke", "every op once at ViT-B/16 shapes against the reference: a one-screen verdict"),
    "predict": ("vitfast.predict", "classify / embed a set of images"),
    "attention-map": ("vitfast.attention_map", "draw the CLS attention of the last layer over an image"),
}


def usage() -> str:
    lines = ["usage: vitfast {" + ",".join(COMMANDS) + "} [options]", ""]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"vitfast: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
