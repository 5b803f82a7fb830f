"""The `vdisk` command: a dispatcher over subcommand modules in this package.

Each module `vdisk/cli/<name>.py` defines `register(subparsers) -> None`, which adds
its subcommand with `set_defaults(func=run)`, where `run(args) -> int` returns the
exit status. Errors of type VdiskError (and OSError about a named file) become one
line on stderr and exit status 1; argparse errors exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import NoReturn

from vdisk import __version__
from vdisk.errors import VdiskError

EPILOG = """\
examples:
  vdisk create -f qcow2 -b base.raw -F raw top.qcow2
  vdisk serve --daemonize --pidfile vdisk.pid --log-file vdisk.log \\
      --mount mnt --qmp vdisk.sock --drive id=disk0,file=top.qcow2
  vdisk qmp vdisk.sock block-stream device=disk0 speed=52428800
  vdisk jobs vdisk.sock --watch
  vdisk qmp vdisk.sock quit

'vdisk COMMAND --help' shows each command's options and examples; docs/OPERATIONS.md
covers running vdisk as a service.
"""

class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the culprit (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vdisk",
        description="Serve qcow2/raw backing chains as raw files over FUSE, with "
        "copy-on-read and live block streaming driven over QMP.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vdisk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except VdiskError as e:
        print(f"vdisk: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"vdisk: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vdisk: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
