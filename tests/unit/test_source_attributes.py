"""Source attributes made valid before a result copies them (dicom_sr.source) and the builders using it.

Real case: the IBSI STS_001 CT (../shared/data; skipped when absent) has a 17-character Study ID (SH
allows 16): the SR and Secondary Captures built from it pass ``dciodvfy``, keep the Study Instance
UID and carry the Study ID cut to 16 characters. Synthetic cases cover each kind of fix on a header
built in memory and on the same header read back from a file (raw, not yet decoded elements); a
synthetic CT series (tests.dicom_factory) with a broken first header runs the builders without
shared data.
"""

from __future__ import annotations

import datetime
import io
import logging
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset, config
from pydicom.dataelem import DataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_sr import SourceFix, source_fixes, valid_source
from dicom_sr.sc.lesions import build_lesion_capture, build_summary_capture
from dicom_sr.sr.lesions import build_measurement_report, write_dataset
from dicom_sr.uids import derive_uid
from inference.results import AlgorithmInfo, LesionResult, SegmentationSource, StudyResult
from tests.conftest import shared_data
from tests.dicom_factory import write_ct_series

WHEN = datetime.datetime(2025, 3, 4, 10, 30, 15)
RESEARCH = AlgorithmInfo("pacs-agent radiomics", "0.1.0", "RESEARCH")
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SECRET_ID = "SECRET-ID-" + "7" * 60
"""An over-long Patient ID (70 > 64) that must never appear in a fix message or a log."""
SECRET_NAME = "Secretname^Given^Middle^Prefix^Suffix^Extra"
"""A Patient Name with six components (PN allows five)."""


# --- synthetic headers -------------------------------------------------------------------------


def source(**values: object) -> Dataset:
    """A valid CT header with ``values`` set on top (without pydicom's validation: they may be invalid)."""
    ds = Dataset()
    with config.disable_value_validation():
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.11"
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.12"
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.13"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.14"
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "ID-1"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "ACME"
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return ds


def written(ds: Dataset, replace: tuple[bytes, bytes] | None = None) -> Dataset:
    """``ds`` written to a file and read back: raw elements, as a received header (bytes replaced first)."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    with config.disable_value_validation():
        ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    if replace is not None:
        assert data.count(replace[0]) == 1
        data = data.replace(*replace)
    return pydicom.dcmread(io.BytesIO(data))


@pytest.fixture(params=["in memory", "read from a file"])
def make(request: pytest.FixtureRequest) -> Callable[[Dataset], Dataset]:
    return (lambda ds: ds) if request.param == "in memory" else written


def actions(fixes: tuple[SourceFix, ...]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for fix in fixes:
        found.setdefault(fix.keyword, set()).add(fix.action)
    return found


def test_over_long_lo_and_sh_values_are_cut_to_the_vr_maximum(make: Callable[[Dataset], Dataset]) -> None:
    nested = Dataset()
    with config.disable_value_validation():
        nested.PatientID = "Q" * 70
    ds = make(
        source(
            PatientID=SECRET_ID,
            AccessionNumber="ACC" + "1" * 17,
            StudyID="IBSI_1_STS_001_CT",
            InstitutionName="I" * 80,
            StationName="S" * 20,
            OtherPatientIDsSequence=[nested],
        )
    )
    clean, fixes = valid_source(ds)
    assert clean.PatientID == SECRET_ID[:64]
    assert clean.AccessionNumber == ("ACC" + "1" * 17)[:16]
    assert clean.StudyID == "IBSI_1_STS_001_C"
    assert clean.InstitutionName == "I" * 64
    assert clean.StationName == "S" * 16
    assert clean.OtherPatientIDsSequence[0].PatientID == "Q" * 64
    assert SourceFix("PatientID", "cut", "cut from 70 to 64 characters (LO allows at most 64)") in fixes
    assert SourceFix("AccessionNumber", "cut", "cut from 20 to 16 characters (SH allows at most 16)") in fixes
    study_id = next(fix for fix in fixes if fix.keyword == "StudyID")
    assert study_id.message == "StudyID: cut from 17 to 16 characters (SH allows at most 16)"
    assert actions(fixes) == {
        "PatientID": {"cut"},
        "AccessionNumber": {"cut"},
        "StudyID": {"cut"},
        "InstitutionName": {"cut"},
        "StationName": {"cut"},
        "OtherPatientIDsSequence > PatientID": {"cut"},
    }


def test_unparseable_dates_and_times_are_emptied_when_type_2_and_removed_when_optional(
    make: Callable[[Dataset], Dataset],
) -> None:
    ds = make(
        source(
            StudyDate="2023-01-01",
            StudyTime="12:00",
            PatientBirthDate="19700231",  # no 31 February
            AcquisitionDate="20230101-20230202",  # a query range, not a date
            AcquisitionTime="250000",
            AcquisitionDateTime="20230101120000-0500",  # valid: UTC offset, not a range
        )
    )
    clean, fixes = valid_source(ds)
    assert (clean.StudyDate, clean.StudyTime, clean.PatientBirthDate) == ("", "", "")
    assert "AcquisitionDate" not in clean
    assert "AcquisitionTime" not in clean
    assert clean.AcquisitionDateTime == "20230101120000-0500"
    assert actions(fixes) == {
        "StudyDate": {"emptied"},
        "StudyTime": {"emptied"},
        "PatientBirthDate": {"emptied"},
        "AcquisitionDate": {"removed"},
        "AcquisitionTime": {"removed"},
    }
    assert SourceFix("StudyDate", "emptied", "emptied: not a valid DA value (Type 1 or 2 in the result)") in fixes


@pytest.mark.parametrize(
    ("keyword", "value", "expected", "action"),
    [
        ("PatientSex", "male", "", "emptied"),  # M, F or O only
        ("PatientSex", "f", "F", "uppercased"),
        ("PatientIdentityRemoved", "yes ", "YES", "uppercased"),
        ("BodyPartExamined", "abdomen", "ABDOMEN", "uppercased"),
        ("BodyPartExamined", "abd-omen", None, "removed"),  # "-" is not a CS character
        ("Laterality", "left", None, "removed"),  # R or L only
    ],
)
def test_code_strings_are_uppercased_or_emptied_when_still_invalid(
    make: Callable[[Dataset], Dataset], keyword: str, value: str, expected: str | None, action: str
) -> None:
    clean, fixes = valid_source(make(source(**{keyword: value})))
    assert clean.get(keyword) == expected
    assert actions(fixes) == {keyword: {action}}


def test_control_characters_are_removed_and_text_keeps_its_line_breaks(make: Callable[[Dataset], Dataset]) -> None:
    ds = make(source(StudyDescription="CT\x00 abdomen\x07", InstitutionAddress="Main St 1\r\nTown\x01 A\\B"))
    clean, fixes = valid_source(ds)
    assert clean.StudyDescription == "CT abdomen"
    assert clean.InstitutionAddress == "Main St 1\r\nTown A\\B"  # ST: CR LF and backslash are text
    assert actions(fixes) == {"StudyDescription": {"removed characters"}, "InstitutionAddress": {"removed characters"}}
    assert fixes[0].reason == "removed 2 control character(s) (LO forbids them, PS3.5 6.1, 6.2)"


def test_a_backslash_inside_a_single_value_is_removed() -> None:
    ds = source()  # pydicom splits a string at backslashes, unless told the value is converted
    ds.add(DataElement(Tag("StudyDescription"), "LO", "CT\\abdomen", already_converted=True))
    clean, fixes = valid_source(ds)
    assert clean.StudyDescription == "CTabdomen"
    assert [fix.action for fix in fixes] == ["removed characters"]


@pytest.mark.parametrize(
    ("name", "expected", "action"),
    [
        ("A" * 70 + "^B", "A" * 64, "cut"),  # 64 characters per component group
        ("A^B^C^D^E^F^G", "A^B^C^D^E", "dropped components"),  # 5 components per group
        ("A^B=C^D=E^F=G^H", "A^B=C^D=E^F", "dropped groups"),  # 3 component groups
    ],
    ids=["group of 72 characters", "6 components", "4 groups"],
)
def test_person_names_are_cut_per_component_group(
    make: Callable[[Dataset], Dataset], name: str, expected: str, action: str
) -> None:
    clean, fixes = valid_source(make(source(PatientName=name)))
    assert str(clean.PatientName) == expected
    assert actions(fixes) == {"PatientName": {action}}


def test_values_beyond_the_vm_are_dropped_and_multi_valued_attributes_kept(make: Callable[[Dataset], Dataset]) -> None:
    clean, fixes = valid_source(make(source(StudyID=["A", "B"], OtherPatientNames=["Doe^J", "Roe^R"])))
    assert clean.StudyID == "A"
    assert list(clean.OtherPatientNames) == ["Doe^J", "Roe^R"]  # VM 1-n
    assert fixes == (SourceFix("StudyID", "dropped values", "dropped 1 value(s) beyond the VM of 1"),)


def test_decimal_strings_are_rewritten_or_removed() -> None:
    ds = written(source(PatientWeight="71.00000000000000001", PatientSize="1.80"), replace=(b"1.80", b"1,80"))
    clean, fixes = valid_source(ds)
    assert clean.PatientWeight == 71.0
    assert len(str(clean.PatientWeight)) <= 16
    assert "PatientSize" not in clean  # "1,80" is not even a number
    assert actions(fixes) == {"PatientWeight": {"reformatted"}, "PatientSize": {"removed"}}


def test_invalid_uids_are_kept_and_reported(make: Callable[[Dataset], Dataset]) -> None:
    clean, fixes = valid_source(make(source(StudyInstanceUID="1.2.03.x", SeriesInstanceUID="1.2.3.05")))
    assert clean.StudyInstanceUID == "1.2.03.x"
    assert clean.SeriesInstanceUID == "1.2.3.05"
    assert actions(fixes) == {"StudyInstanceUID": {"kept invalid UID"}, "SeriesInstanceUID": {"kept invalid UID"}}


def test_a_valid_source_needs_no_fix(make: Callable[[Dataset], Dataset]) -> None:
    clean, fixes = valid_source(make(source(OtherPatientNames=["Doe^J", "Roe^R"], InstitutionAddress="a\r\nb")))
    assert fixes == ()
    assert (clean.PatientID, clean.StudyID, str(clean.PatientName)) == ("ID-1", "1", "Doe^Jane")


def test_the_source_is_neither_changed_nor_decoded(make: Callable[[Dataset], Dataset]) -> None:
    nested = Dataset()
    with config.disable_value_validation():
        nested.PatientID = "Q" * 70
    ds = make(source(PatientID=SECRET_ID, PatientSex="male", StudyDate="2023-01-01", OtherPatientIDsSequence=[nested]))
    elements = {tag: ds.get_item(tag) for tag in list(ds.keys())}  # iterating a Dataset decodes it
    sequence = ds.get_item(Tag("OtherPatientIDsSequence"))  # raw bytes when read from a file
    items = list(sequence.value) if isinstance(sequence, DataElement) else []
    item_elements = [{tag: item.get_item(tag) for tag in list(item.keys())} for item in items]
    clean, fixes = valid_source(ds)
    assert len(fixes) == 4
    assert list(ds.keys()) == list(elements)
    assert all(ds.get_item(tag) is element for tag, element in elements.items())  # same objects, still raw
    for item, before in zip(items, item_elements, strict=True):
        assert list(item.keys()) == list(before)
        assert all(item.get_item(tag) is element for tag, element in before.items())
    assert clean is not ds


def test_values_read_later_from_the_file_are_checked_too(tmp_path: Path) -> None:
    path = tmp_path / "source.dcm"
    written(source(PatientID=SECRET_ID)).save_as(path)
    deferred = pydicom.dcmread(path, defer_size=2)  # every longer value is read when first used
    clean, fixes = valid_source(deferred)
    assert isinstance(clean, FileDataset)
    assert clean.filename == str(path)
    assert clean.PatientID == SECRET_ID[:64]
    assert [(fix.keyword, fix.action) for fix in fixes] == [("PatientID", "cut")]


def test_fix_messages_name_the_attribute_and_never_the_value(make: Callable[[Dataset], Dataset]) -> None:
    values = {
        "PatientID": SECRET_ID,
        "PatientName": SECRET_NAME,
        "PatientSex": "male",
        "PatientBirthDate": "1970-01-01",
        "AccessionNumber": "SECRET-ACCESSION-99",
        "StudyDescription": "Secret\x07description",
    }
    _, fixes = valid_source(make(source(**values)))
    assert {fix.keyword for fix in fixes} == set(values)
    for fix in fixes:
        assert fix.message.startswith(f"{fix.keyword}: ")
        assert str(fix) == fix.message
        assert "ecret" not in fix.message and "male" not in fix.message and "1970" not in fix.message


def test_source_fixes_are_deduplicated_by_keyword_and_action() -> None:
    first = source(StudyID="IBSI_1_STS_001_CT", PatientSex="male")
    second = written(source(StudyID="X" * 20, PatientID=SECRET_ID))
    fixes = source_fixes([first, second, first])
    assert [(fix.keyword, fix.action) for fix in fixes] == [
        ("PatientSex", "emptied"),
        ("StudyID", "cut"),
        ("PatientID", "cut"),
    ]
    assert fixes[1].reason == "cut from 17 to 16 characters (SH allows at most 16)"  # the first one
    assert source_fixes([]) == ()


def test_wrong_argument_types_raise() -> None:
    with pytest.raises(TypeError, match=r'Argument "ds" must have type pydicom\.Dataset'):
        valid_source("not a dataset")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r'Argument "datasets" must be a sequence of pydicom\.Dataset'):
        source_fixes(source())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r'Argument "datasets" must be a sequence of pydicom\.Dataset'):
        source_fixes([source(), "not a dataset"])  # type: ignore[list-item]


# --- builders ----------------------------------------------------------------------------------


def dciodvfy_errors(ds: Dataset, path: Path) -> list[str]:
    """``dciodvfy -new`` lines starting with "Error" (as tests/integration/test_end_to_end.py checks)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    write_dataset(ds, path)
    run = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, check=False, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _square(z: float) -> tuple[tuple[float, float, float], ...]:
    return ((-8.0, -16.0, z), (-4.0, -16.0, z), (-4.0, -12.0, z), (-8.0, -12.0, z), (-8.0, -16.0, z))


@dataclass(frozen=True)
class Synthetic:
    result: StudyResult
    headers: list[Dataset]
    """CT headers read from the files; the first one broken."""


@pytest.fixture
def synthetic(tmp_path: Path) -> Synthetic:
    """A 3-slice synthetic CT whose first header breaks its VRs, and an RTSTRUCT-lesion result on it."""
    series = write_ct_series(tmp_path / "ct", n_slices=3)
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in series.paths]
    with config.disable_value_validation():
        headers[0].PatientID = SECRET_ID
        headers[0].PatientName = SECRET_NAME
        headers[0].PatientSex = "male"
        headers[0].StudyDate = "2023-01-01"
        headers[0].StudyID = "IBSI_1_STS_001_CT"
        headers[0].AccessionNumber = "SECRET-ACCESSION-99"
        headers[0].StudyDescription = "Secret\x07description"
        headers[0].InstitutionName = "Secret hospital " + "x" * 60
        headers[0].BodyPartExamined = "abdomen"
    z = [float(ds.ImagePositionPatient[2]) for ds in series.datasets]
    rtstruct = SegmentationSource(
        kind="rtstruct",
        sop_instance_uid=derive_uid("test source rtstruct"),
        sop_class_uid=RTSTRUCT_CLASS,
        series_instance_uid=derive_uid("test source rtstruct series"),
        number=1,
        label="GTV",
    )
    lesion = LesionResult(
        tracking_id="GTV lesion 1",
        tracking_uid=derive_uid("test source", "GTV lesion 1"),
        source=rtstruct,
        volume_ml=0.05,
        longest_axial_diameter_mm=5.7,
        centroid_mm=(-6.0, -14.0, z[1]),
        key_slice_index=1,
        key_slice_sop_instance_uid=str(series.datasets[1].SOPInstanceUID),
        outline_mm=(_square(z[0]), _square(z[1])),
    )
    result = StudyResult(
        method="M1",
        study_instance_uid=series.study_uid,
        ct_series_instance_uid=series.series_uid,
        frame_of_reference_uid=series.for_uid,
        segmentation=rtstruct,
        algorithm=RESEARCH,
        lesions=(lesion,),
    )
    return Synthetic(result, headers)


def assert_logged_without_values(caplog: pytest.LogCaptureFixture, builds: int = 1) -> None:
    """One warning per fix and build, naming the attribute and the fix, never the value."""
    messages = [r.getMessage() for r in caplog.records if r.name == "dicom_sr.source"]
    assert any("PatientID: cut from 70 to 64 characters" in m for m in messages)
    assert any("PatientSex: emptied" in m for m in messages)
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "dicom_sr.source")
    assert len(messages) == builds * len(set(messages))
    for secret in ("secret", "male", "2023-01-01", "ibsi_1"):
        assert secret not in caplog.text.lower()


def test_sr_from_a_broken_source_copies_only_valid_values(
    synthetic: Synthetic, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    sr = build_measurement_report(synthetic.result, synthetic.headers)
    assert sr.StudyInstanceUID == synthetic.result.study_instance_uid
    assert (sr.PatientID, sr.StudyID, sr.AccessionNumber) == (SECRET_ID[:64], "IBSI_1_STS_001_C", "SECRET-ACCESSION")
    assert (sr.PatientSex, sr.StudyDate) == ("", "")
    assert str(sr.PatientName) == "Secretname^Given^Middle^Prefix^Suffix"
    assert sr.StudyDescription == "Secretdescription"
    assert dciodvfy_errors(sr, tmp_path / "sr.dcm") == []
    assert_logged_without_values(caplog)
    with config.disable_value_validation():  # the caller's header is unchanged
        assert (synthetic.headers[0].PatientID, synthetic.headers[0].PatientSex) == (SECRET_ID, "male")


def test_captures_from_a_broken_source_copy_only_valid_values(
    synthetic: Synthetic, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    ref = synthetic.headers[0]
    lesion = synthetic.result.lesions[0]
    mask = np.zeros((16, 12), dtype=bool)
    mask[4:9, 3:8] = True
    pages = [
        build_summary_capture(synthetic.result, ref, content_datetime=WHEN),
        build_lesion_capture(
            synthetic.result, lesion, np.zeros((16, 12)), mask, ref, content_datetime=WHEN, fov_mm=20.0
        ),
    ]
    for index, page in enumerate(pages):
        assert page.StudyInstanceUID == synthetic.result.study_instance_uid
        assert (page.PatientID, page.StudyID, page.PatientSex) == (SECRET_ID[:64], "IBSI_1_STS_001_C", "")
        assert not page.StudyDate  # empty (Type 2)
        assert page.BodyPartExamined == "ABDOMEN"
        assert "Laterality" not in page  # abdomen is not a paired body part
        assert dciodvfy_errors(page, tmp_path / f"sc{index}.dcm") == []
    assert_logged_without_values(caplog, builds=2)


# --- the real case: IBSI STS_001 -----------------------------------------------------------------


@dataclass(frozen=True)
class Ibsi:
    result: StudyResult
    headers: list[Dataset]
    """CT headers (no pixels) in slice order, as read."""
    rtstruct: Dataset
    key_slice_hu: np.ndarray
    key_slice_mask: np.ndarray


@pytest.fixture(scope="module")
def ibsi() -> Ibsi:
    root = shared_data("ibsi", "ibsi_validation", "dicom", "STS_001", "CT")
    from inference.imaging.lesions import find_lesions, key_outline_px, outline_mm
    from inference.imaging.masks import load_segmentation
    from inference.imaging.volume import load_ct_series

    files = sorted((root / "image").glob("*.dcm"))
    volume = load_ct_series(files)
    rtstruct = pydicom.dcmread(root / "mask" / "RS.dcm")
    label_mask = load_segmentation(rtstruct, volume)[0]
    found = find_lesions(label_mask, volume)[0]
    k = found.key_slice_index
    lesion = LesionResult(
        tracking_id=found.tracking_id,
        tracking_uid=derive_uid("test ibsi", found.tracking_id),
        source=label_mask.source,
        volume_ml=found.volume_ml,
        longest_axial_diameter_mm=found.longest_axial_diameter_mm,
        centroid_mm=found.centroid_mm,
        key_slice_index=k,
        key_slice_sop_instance_uid=volume.sop_instance_uids[k],
        outline_mm=outline_mm(found, volume),
        key_outline_px=key_outline_px(found.mask[k]),
    )
    result = StudyResult(
        method="M1",
        study_instance_uid=volume.study_instance_uid,
        ct_series_instance_uid=volume.series_instance_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        segmentation=label_mask.source,
        algorithm=RESEARCH,
        lesions=(lesion,),
    )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    headers = [by_uid[uid] for uid in volume.sop_instance_uids]
    return Ibsi(result, headers, rtstruct, np.asarray(volume.array[k]), found.mask[k])


def raw_study_id(ds: Dataset) -> bytes:
    """The Study ID as stored (read without decoding: pydicom would warn about its length)."""
    return bytes(ds.get_item("StudyID").value).rstrip(b" \x00")


def test_ibsi_source_has_a_17_character_study_id(ibsi: Ibsi) -> None:
    assert raw_study_id(ibsi.headers[0]) == b"IBSI_1_STS_001_CT"
    assert source_fixes([*ibsi.headers, ibsi.rtstruct]) == (
        SourceFix("StudyID", "cut", "cut from 17 to 16 characters (SH allows at most 16)"),
    )


def test_ibsi_sr_passes_dciodvfy_with_the_study_id_cut(
    ibsi: Ibsi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    sr = build_measurement_report(ibsi.result, ibsi.headers, segmentation_dataset=ibsi.rtstruct)
    assert sr.StudyInstanceUID == ibsi.result.study_instance_uid == str(ibsi.headers[0].StudyInstanceUID)
    assert sr.StudyID == "IBSI_1_STS_001_C"
    assert dciodvfy_errors(sr, tmp_path / "sr.dcm") == []
    assert [r.getMessage() for r in caplog.records if r.name == "dicom_sr.source"] == [
        "source attribute made valid before copying it into a result: "
        "StudyID: cut from 17 to 16 characters (SH allows at most 16)"
    ]
    assert raw_study_id(ibsi.headers[0]) == b"IBSI_1_STS_001_CT"  # the source is unchanged


def test_ibsi_summary_and_lesion_captures_pass_dciodvfy_with_the_study_id_cut(ibsi: Ibsi, tmp_path: Path) -> None:
    lesion = ibsi.result.lesions[0]
    ref = ibsi.headers[lesion.key_slice_index]
    pages = {
        "summary": build_summary_capture(ibsi.result, ref, content_datetime=WHEN),
        "lesion": build_lesion_capture(
            ibsi.result, lesion, ibsi.key_slice_hu, ibsi.key_slice_mask, ref, content_datetime=WHEN
        ),
    }
    for name, page in pages.items():
        assert page.StudyInstanceUID == ibsi.result.study_instance_uid
        assert page.StudyID == "IBSI_1_STS_001_C"
        assert (page.BodyPartExamined, page.Laterality) == ("EXTREMITY", "")  # paired, side unknown: Type 2C empty
        assert dciodvfy_errors(page, tmp_path / f"{name}.dcm") == [], name
    assert raw_study_id(ref) == b"IBSI_1_STS_001_CT"
