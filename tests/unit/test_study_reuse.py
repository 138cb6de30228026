"""The loaded study is handed to the next method of the same study, never across changed files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from inference.phantom import PhantomStudy, generate_study
from inference.pipelines.study import forget_loaded_study, load_study
from pacs_agent.errors import InputError


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(tmp_path_factory.mktemp("reuse"), seed=11, slices=24, rows=64, columns=64, lesions=2)


def test_same_files_give_the_same_loaded_study(phantom: PhantomStudy) -> None:
    forget_loaded_study()
    first = load_study(phantom.ct_files, phantom.seg_file)
    again = load_study(list(phantom.ct_files), Path(phantom.seg_file))
    assert again is first


def test_kept_study_is_read_only(phantom: PhantomStudy) -> None:
    forget_loaded_study()
    study = load_study(phantom.ct_files, phantom.seg_file)
    with pytest.raises(ValueError, match="read-only"):
        study.lesions[0].lesion.mask[0, 0, 0] = True
    with pytest.raises(ValueError, match="read-only"):
        study.masks[0].mask[0, 0, 0] = True
    with pytest.raises(ValueError, match="read-only"):
        study.volume.array[0, 0, 0] = 0.0


def test_forget_and_changed_files_load_again(phantom: PhantomStudy, tmp_path: Path) -> None:
    forget_loaded_study()
    first = load_study(phantom.ct_files, phantom.seg_file)
    forget_loaded_study()
    assert load_study(phantom.ct_files, phantom.seg_file) is not first

    copy = tmp_path / "seg.dcm"
    shutil.copy(phantom.seg_file, copy)
    from_copy = load_study(phantom.ct_files, copy)
    assert from_copy is not first
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the file was rewritten
    assert load_study(phantom.ct_files, copy) is not from_copy


def test_missing_file_is_reported_by_the_loader(phantom: PhantomStudy, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"gone\.dcm"):
        load_study([*phantom.ct_files, tmp_path / "gone.dcm"], phantom.seg_file)
