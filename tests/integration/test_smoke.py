from tests.helpers.commands import vdisk


def test_cli_version() -> None:
    out = vdisk("--version", check=False)
    assert out.returncode == 0
    assert out.stdout.startswith("vdisk ")
