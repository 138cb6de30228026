"""Real exports over the network: storescu -> node -> Orthanc, on every real case in ../shared/data.

One node (``pacs-agent serve``, radiomics, non-contrast series processed) and one Orthanc as the PACS
receive, by DCMTK storescu:

- the four IBSI soft-tissue-sarcoma CTs with their RTSTRUCTs, whose per-image references are stale
  (they name the instances of the original, uncropped series) and whose Study ID breaks its VR:
  each gives an SR in Orthanc well before the 300 s reference wait, dciodvfy-clean, in the same
  study, whose lesion equals the IBSI's own mask (same volume, Dice 1.0 of the SR's outline
  rasterised again) and whose radiomics equal ``pacs-agent radiomics`` on the same files;
- the dcmqi liver CT with its SEG whose one segment is the whole liver: no lesion, the study is
  incomplete with "no tumour structure: Liver (organ ...)";
- the highdicom SEGs on the pydicom CT (bone and spine segments): incomplete, no tumour structure;
- a phantom with BODY, organs, GTV, CTV and PTV (RTSTRUCT) and liver + spleen + lesion segments
  (SEG): only the planted lesions are reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread
from skimage.draw import polygon as fill_polygon
from sqlalchemy import select

from dicom_sr.sr.reader import read_measurement_report
from inference.imaging.volume import CTVolume, load_ct_series
from inference.phantom import PhantomStudy
from inference.results import StudyResult
from pacs_agent.db.tables import Event, Study
from tests.conftest import shared_data
from tests.integration.peers import Node, Nodes, Orthanc, require_tool, storescu, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.phantom(seed=31, lesions=2, slices=24, rows=64, columns=64, clinical_structures=True),
]

STS_CASES = ("STS_001", "STS_010", "STS_012", "STS_015")
SR_DEADLINE_SECONDS = 240
"""Well below the 300 s the node would wait for referenced images that never arrive."""


def ibsi(case: str, *parts: str) -> Path:
    return shared_data("ibsi", "ibsi_validation", *parts[:1], case, *parts[1:])


@pytest.fixture(scope="module")
def sent(
    tmp_path_factory: pytest.TempPathFactory, module_nodes: Nodes, phantom: PhantomStudy
) -> Iterator[tuple[Orthanc, Node]]:
    """Every real case and the clinical phantom, sent to one node that delivers to Orthanc."""
    cases = [ibsi(case, "dicom") for case in STS_CASES]  # skips the module when ../shared/data is absent
    liver = shared_data("dicom_ct_seg", "dcmqi_ct3slice_liver")
    highdicom = shared_data("dicom_ct_seg", "highdicom")
    pydicom_ct = shared_data("dicom_ct_seg", "pydicom_CT2")
    workdir = tmp_path_factory.mktemp("real-exports")
    orthanc = Orthanc(workdir / "orthanc")
    node = module_nodes.new(
        extra_config=(
            orthanc.destination_toml("pacs") + '[jobs]\nmethods = ["radiomics"]\n'
            # none of these exports is a contrast-enhanced portal-venous series
            '[routing]\nwhen_not_portal_venous = "process"\n'
        ),
    )
    orthanc.start()
    try:
        node.start("serve")
        batches = [[*sorted((case / "CT" / "image").glob("*.dcm")), case / "CT" / "mask" / "RS.dcm"] for case in cases]
        batches.append([*sorted(liver.glob("0*.dcm")), liver / "liver.dcm"])
        batches.append(
            [
                *sorted(p for p in pydicom_ct.iterdir() if p.name.isdigit()),
                highdicom / "seg_image_ct_binary.dcm",
                highdicom / "seg_image_ct_binary_overlap.dcm",
            ]
        )
        assert phantom.seg_file is not None and phantom.rtstruct_file is not None
        batches.append([*phantom.ct_files, phantom.seg_file, phantom.rtstruct_file])
        for files in batches:
            result = storescu(node.port, files)
            assert result.returncode == 0, result.stderr
        yield orthanc, node
    finally:
        try:
            module_nodes.stop_all()  # the node first: it may be delivering to Orthanc
        finally:
            orthanc.stop()


def node_studies(node: Node) -> dict[str, Study]:
    return {s.study_instance_uid: s for s in node.scalars(select(Study))}


def node_events(node: Node, study_uid: str) -> list[tuple[str, str]]:
    rows = node.rows(select(Event.kind, Event.detail).where(Event.study_instance_uid == study_uid).order_by(Event.id))
    return [(kind, detail or "") for kind, detail in rows]


def srs_by_study(orthanc: Orthanc) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {}
    for sr in orthanc.instances_with_modality("SR"):
        found.setdefault(sr["StudyInstanceUID"], []).append(orthanc.file(sr["ID"]))
    return found


def study_uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / "object.dcm"
    path.write_bytes(data)
    out = subprocess.run([require_tool("dciodvfy"), "-new", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def rasterise_outline(result_polygons: tuple, volume: CTVolume) -> np.ndarray:
    """The SR's outline polygons filled on the CT grid (even-odd per slice, as an RTSTRUCT is read)."""
    mask = np.zeros(volume.shape, dtype=bool)
    for polygon in result_polygons:
        idx = volume.mm_to_index(np.asarray(polygon, dtype=float))
        k = int(np.round(idx[:, 2].mean()))
        rr, cc = fill_polygon(idx[:, 1], idx[:, 0], shape=mask.shape[1:])
        layer = np.zeros(mask.shape[1:], dtype=bool)
        layer[rr, cc] = True
        mask[k] ^= layer
    return mask


@pytest.fixture(scope="module")
def sts_reports(sent: tuple[Orthanc, Node]) -> dict[str, tuple[bytes, StudyResult]]:
    orthanc, _ = sent
    uids = {case: study_uid(sorted((ibsi(case, "dicom") / "CT" / "image").glob("*.dcm"))) for case in STS_CASES}
    found = wait_for(
        lambda: (srs := srs_by_study(orthanc)) and all(uid in srs for uid in uids.values()) and srs,
        SR_DEADLINE_SECONDS,
        "an SR of every IBSI case in Orthanc",
    )
    return {
        case: (found[uid][0], read_measurement_report(dcmread(BytesIO(found[uid][0])))) for case, uid in uids.items()
    }


@pytest.mark.parametrize("case", STS_CASES)
def test_ibsi_case_gives_a_valid_sr_in_its_study_whose_lesion_is_the_ibsi_mask(
    case: str, sts_reports: dict[str, tuple[bytes, StudyResult]], tmp_path: Path
) -> None:
    data, report = sts_reports[case]
    ct_files = sorted((ibsi(case, "dicom") / "CT" / "image").glob("*.dcm"))
    assert report.study_instance_uid == study_uid(ct_files)
    assert dciodvfy_errors(data, tmp_path) == []
    assert len(dcmread(BytesIO(data)).StudyID) <= 16  # the source's 17 characters were cut, not copied
    (lesion,) = report.lesions
    assert lesion.source.label == "GTV_Mass_CT"
    reference = sitk.ReadImage(str(ibsi(case, "nifti") / "CT_mask.nii.gz"))
    ibsi_mask = sitk.GetArrayFromImage(reference) > 0
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000
    assert lesion.volume_ml == pytest.approx(ibsi_mask.sum() * voxel_ml, rel=1e-6)
    volume = load_ct_series(ct_files)
    ours = rasterise_outline(lesion.outline_mm, volume)
    dice = 2 * (ours & ibsi_mask).sum() / (ours.sum() + ibsi_mask.sum())
    assert dice == 1.0, f"Dice {dice:.5f} of the SR outline against the IBSI mask"


@pytest.mark.parametrize("case", STS_CASES)
def test_ibsi_case_radiomics_equal_the_command_line_on_the_same_files(
    case: str, sts_reports: dict[str, tuple[bytes, StudyResult]]
) -> None:
    _, report = sts_reports[case]
    folder = ibsi(case, "dicom") / "CT"
    out = subprocess.run(
        [sys.executable, "-m", "pacs_agent", "radiomics", "--ct", str(folder / "image"), "--seg",
         str(folder / "mask" / "RS.dcm"), "--per-lesion", "--out", "-"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    (cli_lesion,) = json.loads(out.stdout)["lesions"]
    (lesion,) = report.lesions
    assert lesion.features, "the SR carries no radiomic features"
    for feature in lesion.features:
        assert feature.value == pytest.approx(cli_lesion["features"][feature.name], rel=1e-6), feature.name


def test_ibsi_stale_references_are_a_warning_not_a_wait(
    sent: tuple[Orthanc, Node], sts_reports: dict[str, tuple[bytes, StudyResult]]
) -> None:
    _, node = sent
    studies = node_studies(node)
    for case in STS_CASES:
        study = studies[study_uid(sorted((ibsi(case, "dicom") / "CT" / "image").glob("*.dcm")))]
        warnings = json.loads(study.input_warnings or "[]")
        assert any("per-image reference(s) name instances that are not here" in w for w in warnings), case
        assert any("source attribute StudyID: cut from 17 to 16 characters" in w for w in warnings), case
        notes = json.loads(study.structure_notes or "[]")
        assert [(n["label"], n["role"]) for n in notes] == [("GTV_Mass_CT", "tumour")]
        kinds = [kind for kind, _ in node_events(node, study.study_instance_uid)]
        assert "input_warning" in kinds and "job_scheduled" in kinds


def test_liver_organ_seg_gives_no_lesion_and_an_incomplete_study_with_the_reason(
    sent: tuple[Orthanc, Node], sts_reports: dict[str, tuple[bytes, StudyResult]]
) -> None:
    orthanc, node = sent
    liver = shared_data("dicom_ct_seg", "dcmqi_ct3slice_liver")
    uid = study_uid(sorted(liver.glob("0*.dcm")))
    study = wait_for(lambda: (s := node_studies(node).get(uid)) and s.state == "incomplete" and s, 60, "incomplete")
    assert "no tumour structure: Liver (organ, coded Tissue / Liver)" in (study.state_reason or "")
    assert uid not in srs_by_study(orthanc)
    status = subprocess.run(
        [sys.executable, "-m", "pacs_agent", "status", "--config", str(node.config)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "structure 1 'Liver' of" in status.stdout and "organ (not a lesion) - coded Tissue / Liver" in status.stdout


def test_highdicom_bone_and_spine_segments_are_no_tumour(
    sent: tuple[Orthanc, Node], sts_reports: dict[str, tuple[bytes, StudyResult]]
) -> None:
    orthanc, node = sent
    uid = study_uid(sorted(p for p in shared_data("dicom_ct_seg", "pydicom_CT2").iterdir() if p.name.isdigit()))
    study = wait_for(lambda: (s := node_studies(node).get(uid)) and s.state == "incomplete" and s, 60, "incomplete")
    reason = study.state_reason or ""
    assert reason.count("no tumour structure") == 2, reason
    assert "first segment (organ, coded Tissue / Bone)" in reason
    assert "second segment (organ, coded Anatomical Structure / Spine)" in reason
    assert uid not in srs_by_study(orthanc)


def test_phantom_with_body_organs_and_planning_volumes_reports_only_the_lesions(
    sent: tuple[Orthanc, Node], sts_reports: dict[str, tuple[bytes, StudyResult]], phantom: PhantomStudy
) -> None:
    orthanc, node = sent
    data = wait_for(
        lambda: srs_by_study(orthanc).get(phantom.study_instance_uid), SR_DEADLINE_SECONDS, "the phantom's SR"
    )
    report = read_measurement_report(dcmread(BytesIO(data[0])))
    assert report.segmentation is not None and report.segmentation.kind == "seg"  # a SEG wins over an RTSTRUCT
    assert len(report.lesions) == len(phantom.lesions)
    assert {lesion.source.number for lesion in report.lesions} <= set(phantom.structure_numbers("seg"))
    assert sorted(round(lesion.volume_ml, 3) for lesion in report.lesions) == sorted(
        round(lesion.volume_ml, 3) for lesion in phantom.lesions
    )
    study = node_studies(node)[phantom.study_instance_uid]
    roles = {n["label"]: n["role"] for n in json.loads(study.structure_notes or "[]")}
    assert roles["Liver"] == "organ" and roles["Spleen"] == "organ"
    assert [label for label, role in roles.items() if role == "tumour"] == ["Liver lesions"]
    detail = dict(node_events(node, phantom.study_instance_uid))["structures_chosen"]
    assert "tumour structure(s): Liver lesions; not analysed as lesions: Liver (organ" in detail
