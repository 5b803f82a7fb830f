"""Deferred imports (vdisk.lazyimport) and the daemon's start-up footprint.

Each check runs in a fresh interpreter: what a process has imported is the thing tested.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import ROOT


def _python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_deferred_module_loads_on_first_attribute() -> None:
    out = _python("""
        import sys
        from vdisk import lazyimport
        lazyimport.defer("hmac")
        import hmac
        before = lazyimport.is_loaded("hmac") or "_hashlib" in sys.modules
        ok = hmac.compare_digest(b"abc", b"abc")
        print(before, ok, lazyimport.is_loaded("hmac"), sys.modules["hmac"].__name__)
        import hmac as again
        print(again.digest(b"k", b"m", "sha256").hex()[:8])
    """)
    first, second = out.splitlines()
    assert first == "False True True hmac"
    import hashlib
    import hmac
    assert second == hmac.digest(b"k", b"m", hashlib.sha256).hex()[:8]


def test_from_import_of_a_deferred_module() -> None:
    assert _python("""
        from vdisk import lazyimport
        lazyimport.defer("hmac")
        from hmac import compare_digest
        print(compare_digest(b"x", b"y"), lazyimport.is_loaded("hmac"))
    """) == "False True"


def test_defer_leaves_imported_and_missing_modules_alone() -> None:
    assert _python("""
        import sys, json
        from vdisk import lazyimport
        lazyimport.defer("json", "no_such_module_here")
        print(sys.modules["json"] is json, "no_such_module_here" in sys.modules)
    """) == "True False"


def test_serve_does_not_load_openssl_or_other_commands() -> None:
    """`vdisk serve` imports trio, pyfuse3 and the daemon, but neither OpenSSL (trio's
    TLS helpers are deferred) nor the other subcommands, zstd or the TOML parser."""
    out = _python("""
        import sys
        import vdisk.cli
        vdisk.cli.build_parser("serve")
        import trio, pyfuse3, vdisk.service.daemon
        loaded = [m for m in ("_ssl", "_hashlib", "tomllib", "vdisk.cli.check",
                              "vdisk.cli.demo", "vdisk.cli._demo") if m in sys.modules]
        from vdisk import lazyimport
        print(loaded, lazyimport.is_loaded("zstandard"), "trio" in sys.modules)
    """)
    assert out == "[] False True"


def test_tls_still_works_after_deferring_it() -> None:
    """A remote https:// base needs ssl: the stand-in trio bound must reach the real one."""
    assert _python("""
        import vdisk.cli
        import ssl, trio
        ctx = ssl.create_default_context()
        print(isinstance(ctx, ssl.SSLContext), trio.SSLStream.__name__)
    """) == "True SSLStream"


def test_zstd_clusters_load_zstandard_on_use() -> None:
    assert _python("""
        from vdisk.engine.qcow2 import compress
        from vdisk import lazyimport
        before = lazyimport.is_loaded("zstandard")
        data = bytes(range(256)) * 256
        packed = compress.compress_cluster(compress.COMPRESSION_ZSTD, data)
        same = compress.decompress_cluster(compress.COMPRESSION_ZSTD, packed, len(data)) == data
        print(before, same)
    """) == "False True"


def test_cli_lists_every_command_without_one() -> None:
    res = subprocess.run([sys.executable, "-m", "vdisk", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for name in ("serve", "check", "create", "info", "map", "qmp", "stream", "jobs"):
        assert name in res.stdout
