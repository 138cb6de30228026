"""`make demo` runs `pacs-agent demo`: it must finish unattended and show the results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_prints_the_sr_and_writes_the_captures(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "pacs_agent", "demo", "--out", str(out), "--timeout", "240"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # four SRs (radiomics, m1, m3, comparator; m2 and m4 are chest models, skipped on this abdominal
    # study), each with one group per planted lesion plus its key-slice outline copy (TID 1410), and
    # the three model methods' patient-level result
    assert run.stdout.count("Measurement Group") == 4 * 6 + 3
    assert run.stdout.count("Tracking Identifier: Patient-level result") == 3
    assert "DEMO MODEL - NOT FOR CLINICAL USE" in run.stdout
    assert "KRAS status (predicted)" in run.stdout
    assert "Tracking Identifier: Liver lesions lesion 1" in run.stdout
    assert "Volume:" in run.stdout and " ml" in run.stdout
    assert "PHANTOM" not in run.stdout  # no patient name in what the demo prints
    pngs = sorted((out / "png").glob("*.png"))
    assert len(pngs) == 4 * 4  # per method: a summary page and one page per lesion
    assert not list((out / "state" / "spool" / "tmp").iterdir())
