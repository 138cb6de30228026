"""`pacs-agent train response`: a CSV of per-patient deltas becomes a verified package with a held-out report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from inference.registry import load_package, verify_package
from inference.response.signature import CSV_COLUMNS
from pacs_agent.cli import main


def write_csv(path: Path, patients: int = 80, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*CSV_COLUMNS, "label"])
        for n in range(patients):
            insensitive = n % 2
            shift = 0.0 if insensitive else -0.4  # sensitive tumours lose texture
            values = rng.normal(shift, 0.1, size=len(CSV_COLUMNS))
            writer.writerow([*(f"{v:.5f}" for v in values), "insensitive" if insensitive else "sensitive"])
    return path


def test_trains_a_package_with_a_held_out_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_csv(tmp_path / "deltas.csv")
    out = tmp_path / "pkg"
    assert main(["train", "response", "--csv", str(data), "--out", str(out), "--validation-status", "RESEARCH"]) == 0
    assert "held-out AUC" in capsys.readouterr().out
    assert verify_package(out) == []
    package = load_package(out)
    assert package.method == "response"
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["test"][0]["auc"] > 0.9
    assert (out / "report" / "report.md").exists() and (out / "report" / "roc-test.png").exists()


def test_bad_csv_is_refused_with_the_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_csv(tmp_path / "deltas.csv", patients=10)
    lines = data.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[0], "abc", 1)
    data.write_text("\n".join(lines) + "\n")
    assert main(["train", "response", "--csv", str(data), "--out", str(tmp_path / "pkg")]) == 1
    assert "row 4" in capsys.readouterr().err
