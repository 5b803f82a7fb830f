"""The `vdisk` command: a dispatcher over subcommand modules in this package.

Each module `vdisk/cli/<name>.py` defines `register(subparsers) -> None`, which adds
its subcommand with `set_defaults(func=run)`, where `run(args) -> int` returns the
exit status. Errors of type VdiskError (and OSError about a named file) become one
line on stderr and exit status 1; argparse errors exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import NoReturn

from vdisk import __version__, lazyimport
from vdisk.errors import VdiskError

# trio's TLS helpers would load OpenSSL at start-up; only remote https:// bases use it
lazyimport.defer("ssl", "hmac")

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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of `only` alone if that names one (so that
    `vdisk serve` does not import what the other commands need)."""
    parser = _Parser(
        prog="vdisk",
        description="Serve qcow2/raw backing chains as raw files over FUSE, with "
        "copy-on-read and live block streaming driven over QMP.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vdisk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if only and not only.startswith("_") and only.isidentifier() \
            and importlib.util.find_spec(f"{__name__}.{only}") is not None:
        names = [only]
    else:
        import pkgutil

        names = sorted(m.name for m in pkgutil.iter_modules(__path__)
                       if not m.name.startswith("_"))
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(words[0] if words else None)
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
