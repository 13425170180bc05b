"""The ``preserve-onnx`` command's entry point: loads the command line, so that a Ctrl-C while its
modules are still loading ends with one line too, like a Ctrl-C anywhere later."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from preserve_onnx.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was written\n")
        raise SystemExit(1) from None
    cli_main()
