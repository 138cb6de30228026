"""One study, loaded once: the worker's study loader hands the same read-only study to each method.

The worker-level tests count the files read (every ``pydicom.dcmread`` by path) while a real worker
runs the jobs of a study - radiomics and M1 on the follow-up, then the response method on the pair -
from a real SQLite node database and spool.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from inference.phantom import PhantomStudy, generate_follow_up, generate_study
from inference.pipelines.study import NoLesionError, StudyLoader, load_study
from inference.structures import StructureSelection
from pacs_agent.config import Settings, settings_from_mapping
from pacs_agent.db import Database
from pacs_agent.db.tables import Job, JobState
from pacs_agent.errors import InputError
from pacs_agent.jobs import queue
from pacs_agent.jobs.worker import Worker
from pacs_agent.receive.header import read_header
from pacs_agent.studies.store import record_instance


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(tmp_path_factory.mktemp("reuse"), seed=11, slices=24, rows=64, columns=64, lesions=2)


def test_same_files_give_the_same_loaded_study(phantom: PhantomStudy) -> None:
    loader = StudyLoader()
    first = loader.load(phantom.ct_files, phantom.seg_file)
    again = loader.load(list(phantom.ct_files), Path(phantom.seg_file))
    assert again is first and loader.loads == 1
    assert len(first.ct_headers) == len(phantom.ct_files) and "PixelData" not in first.ct_headers[0]
    assert first.segmentation_dataset.SOPInstanceUID == pydicom.dcmread(phantom.seg_file).SOPInstanceUID


def test_loaded_study_is_read_only(phantom: PhantomStudy) -> None:
    study = StudyLoader().load(phantom.ct_files, phantom.seg_file)
    with pytest.raises(ValueError, match="read-only"):
        study.lesions[0].lesion.mask[0, 0, 0] = True
    with pytest.raises(ValueError, match="read-only"):
        study.masks[0].mask[0, 0, 0] = True
    with pytest.raises(ValueError, match="read-only"):
        study.volume.array[0, 0, 0] = 0.0


def test_forget_changed_files_and_capacity_load_again(phantom: PhantomStudy, tmp_path: Path) -> None:
    loader = StudyLoader(capacity=2)
    first = loader.load(phantom.ct_files, phantom.seg_file)
    loader.forget()
    assert loader.kept == 0
    second = loader.load(phantom.ct_files, phantom.seg_file)
    assert second is not first

    copy = tmp_path / "seg.dcm"
    shutil.copy(phantom.seg_file, copy)
    from_copy = loader.load(phantom.ct_files, copy)
    assert from_copy is not second and loader.kept == 2
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the file was rewritten
    rewritten = loader.load(phantom.ct_files, copy)
    assert rewritten is not from_copy
    assert loader.kept == 2  # never more than its capacity: the oldest was dropped
    assert loader.load(phantom.ct_files, phantom.seg_file) is not second
    assert loader.loads == 5


def test_another_structure_choice_is_another_study(phantom: PhantomStudy) -> None:
    loader = StudyLoader()
    default = loader.load(phantom.ct_files, phantom.seg_file)
    first_only = loader.load(phantom.ct_files, phantom.seg_file, StructureSelection(tumours=(1,)))
    assert first_only is not default and loader.loads == 2


def test_no_lesion_is_an_error_with_its_reason_unless_allowed(phantom: PhantomStudy) -> None:
    loader = StudyLoader()
    nothing = StructureSelection(tumours=())
    with pytest.raises(NoLesionError, match="no tumour structure was chosen") as raised:
        loader.load(phantom.ct_files, phantom.seg_file, nothing)
    assert raised.value.reason == "no-tumour" and isinstance(raised.value, InputError)
    study = loader.load(phantom.ct_files, phantom.seg_file, nothing, allow_no_lesion=True)
    assert study.lesions == () and study.no_lesion is not None and study.no_lesion.reason == "no-tumour"
    assert loader.loads == 1  # the refused study was kept: asking again does not read it again


def test_missing_file_is_reported_by_the_loader(phantom: PhantomStudy, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"gone\.dcm"):
        load_study([*phantom.ct_files, tmp_path / "gone.dcm"], phantom.seg_file)
    with pytest.raises(InputError, match=r"gone\.dcm"):
        StudyLoader().load([*phantom.ct_files, tmp_path / "gone.dcm"], phantom.seg_file)


# --- the worker: each file of a study is read once, whatever the number of methods -----------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomStudy, PhantomStudy]:
    work = tmp_path_factory.mktemp("pair")
    baseline = generate_study(work / "b", seed=5, lesions=2, slices=32, rows=128, columns=128, lesion_scale=1.5)
    return baseline, generate_follow_up(baseline, work / "f", shrink=0.6)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, Database]]:
    settings = settings_from_mapping(
        {"storage": {"state_dir": str(tmp_path / "state")}, "jobs": {"methods": ["radiomics", "m1", "response"]}}
    )
    settings.storage.state_dir.mkdir(parents=True)
    db = Database(settings.database_url)
    yield settings, db
    db.dispose()


def _spool(settings: Settings, db: Database, study: PhantomStudy) -> int:
    """Put a phantom study into the node's spool and database as the receiver would; its study id."""
    series: dict[str, tuple[int, int]] = {}
    with db.session() as session, session.begin():
        for path in [*study.ct_files, study.seg_file]:
            relative = Path(study.study_instance_uid) / path.name
            target = settings.storage.spool_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
            header = read_header(target.read_bytes())
            record_instance(
                session,
                header,
                path=str(relative),
                size_bytes=target.stat().st_size,
                calling_ae_title="TEST",
                series_ids=series,
            )
    return next(iter(series.values()))[0]


def _inputs(study: PhantomStudy) -> dict[str, str]:
    seg = pydicom.dcmread(study.seg_file, stop_before_pixels=True)
    ct = pydicom.dcmread(study.ct_files[0], stop_before_pixels=True)
    return {
        "ct_series_instance_uid": str(ct.SeriesInstanceUID),
        "segmentation_sop_instance_uid": str(seg.SOPInstanceUID),
    }


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every file the code under test reads with pydicom, by name."""
    counts: Counter[str] = Counter()
    real = pydicom.dcmread

    def counting(fp: object, *args: object, **kwargs: object) -> pydicom.Dataset:
        if isinstance(fp, str | os.PathLike):
            counts[str(fp)] += 1
        return real(fp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return counts


def test_a_study_is_read_once_for_all_its_methods_and_the_pair(
    node: tuple[Settings, Database], pair: tuple[PhantomStudy, PhantomStudy], reads: Counter[str]
) -> None:
    settings, db = node
    baseline, follow_up = pair
    _spool(settings, db, baseline)
    follow_id = _spool(settings, db, follow_up)
    base_inputs, follow_inputs = _inputs(baseline), _inputs(follow_up)
    with db.session() as session, session.begin():
        for method in ("radiomics", "m1"):
            queue.schedule_job(session, follow_id, method, follow_inputs, max_attempts=1)
        queue.schedule_job(
            session,
            follow_id,
            "response",
            {
                **follow_inputs,
                "baseline_study_instance_uid": baseline.study_instance_uid,
                "baseline_ct_series_instance_uid": base_inputs["ct_series_instance_uid"],
                "baseline_segmentation_sop_instance_uid": base_inputs["segmentation_sop_instance_uid"],
            },
            max_attempts=1,
        )
    reads.clear()

    worker = Worker(settings, db)
    ran = 0
    while worker.run_one():
        ran += 1
    assert ran == 3
    with db.session() as session:
        jobs = {job.method: (job.state, job.last_error) for job in session.query(Job).all()}
    assert jobs == {m: (JobState.DONE, None) for m in ("radiomics", "m1", "response")}

    spooled = [p for p in reads if p.startswith(str(settings.storage.spool_dir))]
    assert len(spooled) == 2 * (len(baseline.ct_files) + 1)  # every CT image and both segmentations ...
    assert {reads[p] for p in spooled} == {1}, {Path(p).name: n for p, n in reads.items() if n > 1}  # ... once
    assert worker.loader.loads == 2
    assert worker.loader.kept == 0  # the study's jobs are done: its data is dropped


def test_a_worker_keeps_the_study_while_its_jobs_remain(node: tuple[Settings, Database], phantom: PhantomStudy) -> None:
    settings, db = node
    study_id = _spool(settings, db, phantom)
    with db.session() as session, session.begin():
        for method in ("radiomics", "m1"):
            queue.schedule_job(session, study_id, method, _inputs(phantom), max_attempts=1)
    worker = Worker(settings, db)
    assert worker.run_one()
    assert worker.loader.kept == 1  # m1 is still pending: the study stays loaded for it
    assert worker.run_one()
    assert worker.loader.kept == 0 and worker.loader.loads == 1
    assert not worker.run_one()
