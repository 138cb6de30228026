"""A real viewer: OHIF (npm ``@ohif/app``) in headless Chromium shows our results from Orthanc.

Orthanc with its DICOMweb plugin is the PACS; the node gets the phantom study, and sends its SR
and Secondary Captures back by STOW-RS. OHIF's built ``dist/`` is served with Orthanc's DICOMweb
API behind one origin (``tests/integration/ohif/server.py``) and driven by playwright-core on
Debian's Chromium (``tests/integration/ohif/drive.cjs``). The screenshots are written to the
test's temporary folder (and to ``$PACS_AGENT_OHIF_SCREENSHOTS`` when set, e.g. to refresh
``docs/images``), with the SR rendered as text.

Skipped, saying why, only when Chromium, Node.js or the npm registry cannot be had.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from dicom_sr.sr.reader import read_measurement_report
from dicom_sr.sr.text import render_sr_text
from inference.phantom import PhantomStudy, generate_follow_up, generate_study
from tests.integration.ohif.install import RegistryUnavailable, ViewerInstall, install_viewer
from tests.integration.ohif.server import ViewerServer
from tests.integration.peers import Node, Orthanc, storescu, wait_for

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
DRIVER = Path(__file__).parent / "ohif" / "drive.cjs"


@dataclass
class ViewerRun:
    """What the driver reported, plus what the test knows about the study."""

    report: dict[str, Any]
    study: PhantomStudy
    sr_series_uid: str
    sc_series_uid: str
    sc_count: int
    volumes_ml: list[float]
    outline_px: tuple[tuple[float, float], ...]
    """Key-slice outline of the first lesion (SCOORD column, row): what OHIF draws first."""
    proxied: list[tuple[str, str, int]]

    def step(self, name: str) -> dict[str, Any]:
        step = self.report["steps"].get(name)
        assert step is not None, f"the driver did not reach step {name!r}: {self.report.get('fatal')}"
        return step

    def screenshot(self, name: str) -> np.ndarray:
        """The step's screenshot cropped to OHIF's viewport, as an RGB array."""
        step = self.step(name)
        image = np.asarray(Image.open(step["screenshot"]).convert("RGB"))
        box = step["box"]
        assert box, f"no viewport in step {name}"
        x, y, w, h = (round(box[k]) for k in ("x", "y", "width", "height"))
        return image[y : y + h, x : x + w]


def _drive(install: ViewerInstall, orthanc: Orthanc, arguments: dict[str, Any]) -> tuple[dict[str, Any], list]:
    """Serve OHIF in front of Orthanc and run the driver; returns its report and the proxied requests."""
    timeout = int(arguments.get("timeoutSeconds", 150)) + 20
    with ViewerServer(install.dist, orthanc.url) as server:
        result = subprocess.run(
            ["node", str(DRIVER), json.dumps({**arguments, "viewer": server.url, "chromium": str(CHROMIUM)})],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env={**os.environ, "NODE_PATH": str(install.node_modules)},
        )
        proxied = list(server.requests)
    assert result.stdout, f"the driver printed nothing (exit {result.returncode}):\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    assert "fatal" not in report, f"{report['fatal']}\n{result.stderr[-3000:]}"
    return report, proxied


def _require_viewer() -> ViewerInstall:
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (apt-get install chromium; `make test` installs it)")
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed (apt-get install nodejs npm; `make test` installs them)")
    try:
        return install_viewer()
    except RegistryUnavailable as exc:
        pytest.skip(f"OHIF cannot be installed: {exc}")


@pytest.fixture(scope="module")
def viewer_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ViewerRun]:
    install = _require_viewer()
    root = tmp_path_factory.mktemp("ohif")
    study = generate_study(root / "phantom", seed=11, lesions=3, slices=40, rows=128, columns=128)
    orthanc = Orthanc(root / "orthanc", plugins=["dicomweb"])
    node = Node(
        root / "node",
        extra_config=f'[[destinations]]\nname = "pacs"\ntype = "stowrs"\nurl = "{orthanc.dicomweb_url}"\n',
    )
    orthanc.start()
    try:
        assert study.seg_file is not None
        orthanc.upload([*study.ct_files, study.seg_file])  # the PACS holds the study ...
        node.start("serve")
        assert storescu(node.port, [*study.ct_files, study.seg_file]).returncode == 0  # ... and sends it to us
        sc_count = len(study.lesions) + 1
        srs = wait_for(lambda: orthanc.instances_with_modality("SR"), 180, "the SR in Orthanc")
        scs = wait_for(
            lambda: (found := orthanc.instances_with_modality("OT")) and len(found) == sc_count and found,
            60,
            "the Secondary Captures in Orthanc",
        )
        node.stop()
        sr = dcmread(BytesIO(orthanc.file(srs[0]["ID"])))
        lesions = read_measurement_report(sr).lesions
        volumes = [lesion.volume_ml for lesion in lesions]
        shots = root / "screenshots"
        shots.mkdir()
        arguments = {
            "study": study.study_instance_uid,
            "scImages": sc_count,
            "out": str(shots),
        }
        report, proxied = _drive(install, orthanc, arguments)
        target = os.environ.get("PACS_AGENT_OHIF_SCREENSHOTS")
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            for png in shots.glob("*.png"):
                name = "ohif-sr-measurements.png" if png.name == "sr.png" else f"ohif-{png.name}"
                shutil.copy(png, Path(target) / name)
            (Path(target) / "sr-text.txt").write_text(render_sr_text(sr) + "\n")
        yield ViewerRun(
            report=report,
            study=study,
            sr_series_uid=str(sr.SeriesInstanceUID),
            sc_series_uid=scs[0]["SeriesInstanceUID"],
            sc_count=sc_count,
            volumes_ml=volumes,
            outline_px=lesions[0].key_outline_px,
            proxied=proxied,
        )
    finally:
        if node.process is not None:
            node.stop()
        orthanc.stop()


def test_the_study_with_our_results_loads(viewer_run: ViewerRun) -> None:
    step = viewer_run.step("study")
    assert step["ok"], step.get("error")
    series = {(s["modality"], s["description"]) for s in step["series"]}
    assert {
        ("CT", "ABDOMEN PORTAL VENOUS 70s"),
        ("SEG", "LIVER LESIONS SEG"),
        ("SR", "AI Radiomics"),
        ("OT", "AI Radiomics"),
    } <= series, series
    assert "I:1 (1/40)" in step["overlay"]  # the CT series is displayed
    assert viewer_run.report["pageErrors"] == []
    assert viewer_run.report["httpErrors"] == []
    assert [r for r in viewer_run.proxied if r[2] >= 400] == []


def test_the_secondary_captures_display(viewer_run: ViewerRun) -> None:
    summary, lesion = viewer_run.step("sc"), viewer_run.step("sc-lesion")
    assert summary["ok"], summary.get("error")
    assert lesion["ok"], lesion.get("error")
    assert "AI Radiomics" in summary["overlay"]
    assert f"I:1 (1/{viewer_run.sc_count})" in summary["overlay"]
    assert f"I:2 (2/{viewer_run.sc_count})" in lesion["overlay"]
    # OHIF fetched the frames of our series through DICOMweb ...
    frames = [r for r in viewer_run.proxied if viewer_run.sc_series_uid in r[1] and "/frames/" in r[1]]
    assert frames and all(status == 200 for _, _, status in frames), frames
    # ... and drew them: the summary page's light text, the lesion page's green contour
    page = viewer_run.screenshot("sc")
    bright = (page.min(axis=2) > 200).mean()
    assert bright > 0.002, f"too little text visible on the summary page ({bright:.4f})"
    outline = viewer_run.screenshot("sc-lesion").astype(int)
    green = (outline[..., 1] > 180) & (outline[..., 0] < 90) & (outline[..., 2] < 90)
    assert green.sum() > 200, f"the lesion contour is not visible ({green.sum()} green pixels)"


def test_the_sr_opens_without_an_error(viewer_run: ViewerRun) -> None:
    step = viewer_run.step("sr")
    assert step["ok"], step.get("error")
    assert viewer_run.report["pageErrors"] == []
    assert viewer_run.report["consoleErrors"] == []
    metadata = [r for r in viewer_run.proxied if viewer_run.sr_series_uid in r[1]]
    assert metadata and all(status == 200 for _, _, status in metadata), metadata


def _outline_on_screen(outline_px: tuple[tuple[float, float], ...], width: int, height: int) -> np.ndarray:
    """Viewport pixels (x, y) of an SCOORD outline on the phantom's 128 x 128 slice, densely sampled.

    OHIF fits the whole slice into the viewport, centred (cornerstone's default camera).
    """
    scale = min(width / 128, height / 128)
    x0, y0 = (width - 128 * scale) / 2, (height - 128 * scale) / 2
    points = np.asarray(outline_px, dtype=float)
    samples = [a + (b - a) * t for a, b in itertools.pairwise(points) for t in np.linspace(0, 1, 8)]
    return np.array([(x0 + x * scale, y0 + y * scale) for x, y in samples])


def _near_green(page: np.ndarray, points: np.ndarray, radius: int = 4) -> float:
    """Fraction of ``points`` with a pure-green pixel (OHIF's active SR annotation) within ``radius``."""
    rgb = page.astype(int)
    green = (rgb[..., 1] > 180) & (rgb[..., 0] < 100) & (rgb[..., 2] < 100)
    hits = 0
    for x, y in np.round(points).astype(int):
        window = green[max(y - radius, 0) : y + radius + 1, max(x - radius, 0) : x + radius + 1]
        hits += bool(window.any())
    return hits / len(points)


def test_the_sr_viewport_shows_our_measurements(viewer_run: ViewerRun) -> None:
    step = viewer_run.step("sr")
    assert step["drawn"], "OHIF drew no measurement of our SR"
    # the first lesion (OHIF shows the SR's first measurement on its key slice): its volume, once
    # (the TID 1410 viewer copy and the TID 1411 record are merged by tracking UID, not repeated)
    volume = f"Volume: {viewer_run.volumes_ml[0]:.2f} ml"
    assert step["svgText"].count(volume) == 1, step["svgText"]
    assert "L: : " in step["svgText"], step["svgText"]  # OHIF's shorthand for "Long Axis"
    # ... next to its outline, drawn where the lesion is (the key-slice POLYLINE), and nowhere else
    page = viewer_run.screenshot("sr")
    height, width = page.shape[:2]
    outline = _outline_on_screen(viewer_run.outline_px, width, height)
    assert _near_green(page, outline) > 0.8, "the lesion outline is not drawn where the lesion is"
    assert _near_green(page, outline - np.array([width / 4, 0.0])) < 0.2, "green everywhere: the check cannot tell"
    assert viewer_run.report["pageErrors"] == []


def test_our_sr_is_loaded_as_tracked_measurements_listing_every_lesion(viewer_run: ViewerRun) -> None:
    """No "not compatible" badge: OHIF offers to track the SR, then lists each lesion with its label."""
    step = viewer_run.step("sr-track")
    assert step["ok"], step.get("error")
    assert step["asked"], "OHIF did not offer to track the SR's measurements (not compatible?)"
    panel = step["panel"]
    count = len(viewer_run.volumes_ml)
    assert panel["header"] == f"Measurements ({count})", panel
    for n in range(1, count + 1):
        assert f"Liver lesions lesion {n}: " in panel["text"], panel["text"]
    assert "ml, long axis" in panel["text"], panel["text"]  # the Comment: the lesion's result


# --- every method's SR, and the response SR ----------------------------------------------------------

EVERY_METHOD = ("radiomics", "m1", "m2", "m3", "m4", "comparator", "response")
"""Every method, with the DEMO packages (M2 / M4, chest methods, are routed to the abdominal phantom too)."""


@dataclass
class EveryMethodRun:
    report: dict[str, Any]
    descriptions: dict[str, str]
    """Series Description of each method's SR in the follow-up study."""
    lesions: dict[str, int]
    """Lesions (measurement groups of lesion records) in each method's SR."""
    study_series: list[dict[str, str]]


@pytest.fixture(scope="module")
def every_method_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EveryMethodRun]:
    """A baseline and an 8-week follow-up through every method; OHIF opens each SR of the follow-up."""
    install = _require_viewer()
    root = tmp_path_factory.mktemp("ohif-every")
    baseline = generate_study(root / "baseline", seed=41, lesions=2, slices=40, rows=128, columns=128)
    follow_up = generate_follow_up(baseline, root / "follow-up", shrink=0.5, texture_change="homogenise")
    orthanc = Orthanc(root / "orthanc", plugins=["dicomweb"])
    node = Node(
        root / "node",
        extra_config=(
            f'[[destinations]]\nname = "pacs"\ntype = "stowrs"\nurl = "{orthanc.dicomweb_url}"\n'
            f"[jobs]\nmethods = {json.dumps(list(EVERY_METHOD))}\n[models]\nuse_demo = true\n"
            "[routing.method_regions]\n"  # no method is restricted to a body region here
        ),
    )
    orthanc.start()
    try:
        for study in (baseline, follow_up):
            assert study.seg_file is not None
            orthanc.upload([*study.ct_files, study.seg_file])
        node.start("serve")
        for study in (baseline, follow_up):
            assert storescu(node.port, [*study.ct_files, study.seg_file]).returncode == 0  # type: ignore[list-item]

        def follow_up_srs() -> list[dict[str, Any]]:
            found = [
                sr
                for sr in orthanc.instances_with_modality("SR")
                if sr["StudyInstanceUID"] == follow_up.study_instance_uid
            ]
            return found if len(found) == len(EVERY_METHOD) else []

        srs = wait_for(follow_up_srs, 420, "an SR of every method for the follow-up in Orthanc")
        node.stop()
        descriptions: dict[str, str] = {}
        lesions: dict[str, int] = {}
        for sr in srs:
            ds = dcmread(BytesIO(orthanc.file(sr["ID"])))
            method = EVERY_METHOD[int(ds.SeriesNumber) - 901]  # 901-907 in this order (dicom_sr.series)
            descriptions[method] = str(ds.SeriesDescription)
            lesions[method] = _viewer_groups(ds)
        shots = root / "screenshots"
        shots.mkdir()
        report, _ = _drive(
            install,
            orthanc,
            {
                "study": follow_up.study_instance_uid,
                "srs": [descriptions[m] for m in EVERY_METHOD],
                "out": str(shots),
                "timeoutSeconds": 420,
            },
        )
        target = os.environ.get("PACS_AGENT_OHIF_SCREENSHOTS")
        if target:
            for png in shots.glob("sr-*.png"):
                shutil.copy(png, Path(target) / f"ohif-{png.name}")
        yield EveryMethodRun(report, descriptions, lesions, report["steps"]["study"]["series"])
    finally:
        if node.process is not None:
            node.stop()
        orthanc.stop()


def _viewer_groups(sr: Any) -> int:
    """How many key-slice groups (one per lesion) an SR holds."""
    imaging = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return sum(
        1
        for group in imaging.ContentSequence
        for item in group.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "112039" and str(item.TextValue).startswith("Cornerstone3D")
    )


def test_every_result_series_is_told_apart_in_the_study_browser(every_method_run: EveryMethodRun) -> None:
    ours = [s for s in every_method_run.study_series if s["description"].startswith("AI ")]
    srs = [s["description"] for s in ours if s["modality"] == "SR"]
    assert sorted(srs) == sorted(every_method_run.descriptions.values())
    assert len(set(srs)) == len(srs) == len(EVERY_METHOD)
    assert every_method_run.descriptions["m1"] == "AI KRAS M1 - DEMO, not for clinical use"


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_methods_sr_opens_drawn_and_tracked_with_its_lesions(
    every_method_run: EveryMethodRun, method: str
) -> None:
    description = every_method_run.descriptions[method]
    step = every_method_run.report["steps"].get(f"sr:{description}")
    assert step is not None and step["ok"], step
    assert step["drawn"], f"OHIF drew nothing of the {method} SR"
    assert step["asked"], f"OHIF does not offer to track the {method} SR (not compatible?)"
    count = every_method_run.lesions[method]
    assert count >= 1
    panel = step["panel"]
    assert panel["header"] == f"Measurements ({count})", panel
    demo = method != "radiomics"  # the committed DEMO packages; plain radiomics has no model
    assert panel["text"].count("[DEMO] ") == (count if demo else 0), panel["text"]  # DEMO first on every label
    expected = {
        "radiomics": "ml, long axis",
        "m1": "KRAS ",
        "m2": "EGFR ",
        "m3": "RAS ",
        "m4": "EGFR ",
        "comparator": "KRAS ",
        "response": "volume ",
    }[method]
    assert expected in panel["text"], panel["text"]
