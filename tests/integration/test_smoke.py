import subprocess
import sys


def test_cli_version() -> None:
    out = subprocess.run([sys.executable, "-m", "vdisk", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.startswith("vdisk ")
