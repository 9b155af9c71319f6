"""One size format: convert, list and rm print a file's size the same way, in the units memory is counted in."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.test_store_safety import REPO_ID, add_model
from yi_local.units import format_size


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1_600_000, "1.5 MiB"), (1024**2 - 52, "1023.9 KiB"),
    (1024**2 - 51, "1.0 MiB"),  # 1023.95 KiB would print as 1024.0 KiB: the next unit instead
    (3_666_926_489, "3.4 GiB"), (5 << 40, "5.0 TiB"), (3 << 60, "3072.0 PiB"),
])  # fmt: skip
def test_format_size(n, text):
    assert format_size(n) == text


def test_commands_print_a_size_alike(ggufs, tmp_path):
    out = tmp_path / "m-Q8_0.gguf"
    converted = run_cli("convert", str(ggufs["f16"]), "--q", "Q8_0", "-o", str(out))
    assert converted.returncode == 0, converted.stderr
    size = format_size(out.stat().st_size)
    assert size.endswith(" MiB") and f"wrote {out} ({size})" in converted.stdout

    add_model(out)
    listing = run_cli("list")
    row = next(line for line in listing.stdout.splitlines() if REPO_ID in line)
    assert f" {size} " in row, listing.stdout  # not "0.00 GB"
    removed = run_cli("rm", REPO_ID, "--yes")
    assert removed.returncode == 0 and f"freeing {size}" in removed.stdout, removed.stdout
