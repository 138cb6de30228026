"""Model packages: write, verify, load, predict, install; every refusal path names what is wrong."""

from __future__ import annotations

import io
import os
import stat
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.preprocessing import FunctionTransformer

from inference.networks import FIVE_LABELS, GROUPED_LABELS, EfficientNetAttention, M1Model, ResNetKRAS
from inference.registry import (
    ModelPackage,
    install_package,
    list_packages,
    load_package,
    sha256_file,
    verify_package,
    write_package,
)
from inference.registry.cli import models_install, models_list, models_verify
from inference.registry.files import dump_toml
from inference.results import AlgorithmInfo
from pacs_agent.errors import ModelPackageError

M1_ARCH = {"width": 0.125, "blocks": 2}
M3_ARCH = {"width": 0.25, "depth": 0.25, "heads": 4}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks run fastest single-threaded on shared cores (no OpenMP oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def metadata(method: str = "m1", labels: tuple[str, ...] = ("KRAS",), **over) -> dict:
    meta = {
        "name": f"{method}-test",
        "version": "0.1.0",
        "method": method,
        "labels": list(labels),
        "validation_status": "DEMO",
        "intended_use": "Unit tests only. DEMO MODEL - NOT FOR CLINICAL USE.",
        "description": "tiny network",
        "input": {"shape": [80, 80], "dtype": "float32", "margin_px": 20},
        "architecture": dict(M1_ARCH),
        "normalisation": {"mean": 40.0, "std": 100.0},
        "thresholds": dict.fromkeys(labels, 0.5),
        "training_data": {"description": "random init, no training", "patients": 0},
        "metrics": {label: {"auc": 0.5, "auc_ci": [0.4, 0.6]} for label in labels},
    }
    meta.update(over)
    return meta


def m1_network() -> ResNetKRAS:
    torch.manual_seed(0)
    return ResNetKRAS(**M1_ARCH)


@pytest.fixture
def m1_package(tmp_path: Path) -> Path:
    return write_package(tmp_path / "m1pkg", metadata(), {"model": ("model.pt", m1_network())})


def edit_manifest(pkg: Path, **changes) -> None:
    data = tomllib.loads((pkg / "model.toml").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    (pkg / "model.toml").write_text(dump_toml(data))


def zip_dir(pkg: Path, dest: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for f in sorted(pkg.rglob("*")):
            zf.write(f, prefix + f.relative_to(pkg).as_posix())
    return dest


# --- the good path -------------------------------------------------------------------------------


def test_write_verify_load_predict(m1_package: Path):
    assert verify_package(m1_package) == []
    package = load_package(m1_package)
    assert isinstance(package, ModelPackage)
    assert (package.name, package.version, package.method, package.labels) == ("m1-test", "0.1.0", "m1", ("KRAS",))
    assert package.thresholds == {"KRAS": 0.5}
    assert package.metrics["KRAS"]["auc_ci"] == [0.4, 0.6]
    assert package.input_spec["shape"] == [80, 80]
    assert package.weights_sha256 == sha256_file(m1_package / "model.pt")
    assert package.algorithm_info() == AlgorithmInfo(
        name="m1-test",
        version="0.1.0",
        validation_status="DEMO",
        weights_sha256=package.weights_sha256,
        intended_use="Unit tests only. DEMO MODEL - NOT FOR CLINICAL USE.",
    )
    assert package.algorithm_info().is_demo
    model = package.model
    assert isinstance(model, M1Model) and model is package.model  # built once, then cached
    crops = np.random.default_rng(0).normal(40, 100, (3, 24, 24)).astype(np.float32)
    probs = model(crops)
    # the loaded weights are the written ones: same outputs as the original network
    reference = M1Model(m1_network(), normalisation=model.normalisation, device="cpu")(crops)
    assert [p["KRAS"] for p in probs] == pytest.approx([p["KRAS"] for p in reference], abs=1e-6)


def test_load_from_zip_at_root_and_in_a_folder(m1_package: Path, tmp_path: Path):
    for prefix in ("", "m1-test-0.1.0/"):
        archive = zip_dir(m1_package, tmp_path / f"pkg{len(prefix)}.zip", prefix)
        assert verify_package(archive) == []
        package = load_package(archive)
        assert package.method == "m1"
        assert len(package.model(np.zeros((1, 16, 16), dtype=np.float32))) == 1


def test_sklearn_package_loads_with_trusted_types(tmp_path: Path):
    x = np.random.default_rng(0).normal(size=(40, 4))
    forest = RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0).fit(x, x[:, 0] > 0)
    meta = metadata("radiomics", input={"features": ["a", "b", "c", "d"]})
    del meta["architecture"], meta["normalisation"]
    pkg = write_package(tmp_path / "rf", meta, {"classifier": ("classifier.skops", forest)})
    package = load_package(pkg)
    np.testing.assert_array_equal(package.model.predict_proba(x), forest.predict_proba(x))
    assert package.algorithm_info().weights_sha256 == sha256_file(pkg / "classifier.skops")


def test_install_list_and_reinstall(m1_package: Path, tmp_path: Path):
    models = tmp_path / "models"
    archive = zip_dir(m1_package, tmp_path / "pkg.zip")
    target = install_package(archive, models)
    assert target == models / "m1-test-0.1.0"
    assert sorted(p.name for p in target.iterdir()) == ["model.pt", "model.toml"]
    assert install_package(m1_package, models) == target  # same content: no-op
    [entry] = list_packages(models, verify=True)
    assert (entry.name, entry.version, entry.method, entry.problems) == ("m1-test", "0.1.0", "m1", ())
    other = write_package(tmp_path / "other", metadata(), {"model": ("model.pt", ResNetKRAS(**M1_ARCH))})
    with pytest.raises(ModelPackageError, match="already exists with different content"):
        install_package(other, models)
    assert list_packages(tmp_path / "nowhere") == []


def test_cli_functions(m1_package: Path, tmp_path: Path):
    out = io.StringIO()
    assert models_verify(m1_package, out=out) == 0
    assert "OK - m1-test 0.1.0" in out.getvalue()
    assert models_install(m1_package, tmp_path / "models", out=out) == 0
    out = io.StringIO()
    assert models_list(tmp_path / "models", verify=True, out=out) == 0
    assert "m1-test" in out.getvalue() and "OK" in out.getvalue()
    (m1_package / "model.pt").write_bytes(b"tampered")
    out = io.StringIO()
    assert models_verify(m1_package, out=out) == 1
    assert "model.pt" in out.getvalue()
    assert models_install(m1_package, tmp_path / "models2", out=out) == 1


def test_toml_writer_round_trips():
    data = {
        "name": 'quote " and \\ backslash',
        "n": 3,
        "x": 0.1,
        "flag": True,
        "labels": list(GROUPED_LABELS),
        "thresholds": {"PIK3CA+BRAF": 0.25, "RAS": 1.0},
        "metrics": {"RAS": {"auc": 0.9, "ci": [0.8, 1.0]}, "empty": {}},
    }
    assert tomllib.loads(dump_toml(data)) == data
    with pytest.raises(ValueError, match="TOML"):
        dump_toml({"rows": [{"a": 1}]})


# --- refusals ------------------------------------------------------------------------------------


def test_tampered_weights_are_refused_naming_the_file(m1_package: Path):
    weights = m1_package / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    problems = verify_package(m1_package)
    assert len(problems) == 1
    assert "'model.pt' failed its checksum" in problems[0]
    with pytest.raises(ModelPackageError, match=r"model\.pt' failed its checksum"):
        load_package(m1_package)


def test_weights_changed_after_loading_are_refused_when_the_model_is_built(m1_package: Path):
    package = load_package(m1_package)
    torch.save(ResNetKRAS(**M1_ARCH).state_dict(), m1_package / "model.pt")
    with pytest.raises(ModelPackageError, match=r"model\.pt. failed its checksum"):
        package.build_model()


def test_missing_weights_file(m1_package: Path):
    (m1_package / "model.pt").unlink()
    assert any("'model.pt'" in p and "missing" in p for p in verify_package(m1_package))


def test_unknown_method(m1_package: Path):
    edit_manifest(m1_package, method="m9")
    assert any("unknown method 'm9'" in p for p in verify_package(m1_package))
    with pytest.raises(ModelPackageError, match="unknown method 'm9'"):
        load_package(m1_package)


@pytest.mark.parametrize("key", ["name", "labels", "intended_use", "thresholds", "weights", "training_data"])
def test_missing_keys(m1_package: Path, key: str):
    edit_manifest(m1_package, **{key: None})
    assert f"model.toml: missing key {key!r}" in verify_package(m1_package)


def test_manifest_value_checks(m1_package: Path):
    edit_manifest(
        m1_package,
        validation_status="APPROVED",
        thresholds={"KRAS": 1.5},
        normalisation={"mean": 40.0, "std": 0.0},
        input={"shape": [80]},
        architecture={"width": 0.125, "blocks": 2, "kernel": 3},
        bogus=1,
    )
    problems = verify_package(m1_package)
    assert problems == ["model.toml: unknown key 'bogus'"]
    edit_manifest(m1_package, bogus=None)
    problems = "\n".join(verify_package(m1_package))
    assert "validation_status must be one of DEMO, RESEARCH, VALIDATED" in problems
    edit_manifest(m1_package, validation_status="DEMO")
    problems = "\n".join(verify_package(m1_package))
    for expected in ("threshold 'KRAS' must be a number in [0, 1]", "std must be > 0", "[input] shape", "'kernel'"):
        assert expected in problems


def test_label_names_name_the_labels_for_readers(m1_package: Path):
    edit_manifest(m1_package, label_names={"KRAS": "KRAS (codon 12/13)"})
    package = load_package(m1_package)
    assert package.label_name("KRAS") == "KRAS (codon 12/13)"
    assert package.label_name("EGFR") == "EGFR"  # a label without a name is shown as it is
    edit_manifest(m1_package, label_names={"NRAS": "x", "KRAS": ""})
    problems = "\n".join(verify_package(m1_package))
    assert "[label_names] names 'NRAS', which is not one of the labels ['KRAS']" in problems
    assert "[label_names] 'KRAS' must be a non-empty string of at most 40 characters" in problems


def test_label_mismatch_with_the_weights(tmp_path: Path):
    torch.manual_seed(0)
    net = EfficientNetAttention(len(FIVE_LABELS), **M3_ARCH)
    meta = metadata("m3", FIVE_LABELS, architecture=M3_ARCH, input={"shape": [128, 128]})
    pkg = write_package(tmp_path / "m3", meta, {"model": ("model.pt", net)})
    assert verify_package(pkg) == []
    edit_manifest(pkg, labels=list(GROUPED_LABELS), thresholds=dict.fromkeys(GROUPED_LABELS, 0.5))
    [problem] = verify_package(pkg)
    assert "labels do not match the architecture's outputs" in problem
    assert "need 3 network outputs but the weights have 5" in problem


def test_m1_takes_one_label(m1_package: Path):
    edit_manifest(m1_package, labels=["KRAS", "NRAS"], thresholds={"KRAS": 0.5, "NRAS": 0.5})
    assert any("exactly one label" in p for p in verify_package(m1_package))


def test_architecture_mismatch_with_the_weights(m1_package: Path):
    edit_manifest(m1_package, architecture={"width": 0.25, "blocks": 2})
    [problem] = verify_package(m1_package)
    assert "do not fit the [architecture] table" in problem and "wrong shape" in problem
    edit_manifest(m1_package, architecture={"width": 0.125, "blocks": 3})
    [problem] = verify_package(m1_package)
    assert "missing tensors" in problem


def test_pickled_code_in_torch_weights_is_refused(m1_package: Path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should never run",))

    torch.save({"fc.weight": Payload()}, m1_package / "model.pt")
    edit_manifest(m1_package, weights={"model": {"file": "model.pt", "sha256": sha256_file(m1_package / "model.pt")}})
    [problem] = verify_package(m1_package)
    assert "'model.pt' is not a plain torch state dict (weights_only load refused it)" in problem


def test_untrusted_skops_type_is_refused(tmp_path: Path):
    meta = metadata("radiomics")
    del meta["architecture"], meta["normalisation"]
    evil = sio.dumps(FunctionTransformer(func=os.system))
    with pytest.raises(ModelPackageError, match=r"untrusted type\(s\) \['posix.system'\]"):
        write_package(tmp_path / "evil", meta, {"classifier": ("classifier.skops", evil)})
    assert any("posix.system" in p for p in verify_package(tmp_path / "evil"))


def test_zip_with_path_traversal_is_refused(m1_package: Path, tmp_path: Path):
    archive = zip_dir(m1_package, tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("../outside.txt", b"x")
    [problem] = verify_package(archive)
    assert "path traversal" in problem and "../outside.txt" in problem
    with pytest.raises(ModelPackageError, match="path traversal"):
        install_package(archive, tmp_path / "models")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("name", ["/etc/evil", "C:/evil", "sub/../../evil"])
def test_zip_with_absolute_or_dotdot_entries_is_refused(m1_package: Path, tmp_path: Path, name: str):
    archive = zip_dir(m1_package, tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(zipfile.ZipInfo(name), b"x")
    assert any("escape the package" in p for p in verify_package(archive))


def test_zip_with_symlink_entry_is_refused(m1_package: Path, tmp_path: Path):
    archive = zip_dir(m1_package, tmp_path / "evil.zip")
    link = zipfile.ZipInfo("link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    assert any("symlink" in p for p in verify_package(archive))


def test_weights_path_outside_the_package_is_refused(m1_package: Path):
    sha = sha256_file(m1_package / "model.pt")
    edit_manifest(m1_package, weights={"model": {"file": "../model.pt", "sha256": sha}})
    assert any("no absolute path, no '..'" in p for p in verify_package(m1_package))


def test_not_a_package(tmp_path: Path):
    assert verify_package(tmp_path / "missing") == [f"{tmp_path / 'missing'} does not exist"]
    assert verify_package(tmp_path) == [f"{tmp_path} has no model.toml"]
    (tmp_path / "junk.bin").write_bytes(b"not a zip")
    assert "neither a package directory nor a zip" in verify_package(tmp_path / "junk.bin")[0]
    (tmp_path / "model.toml").write_text("name = ")
    assert "not valid TOML" in verify_package(tmp_path)[0]


def test_write_package_refuses_bad_input(m1_package: Path, tmp_path: Path):
    with pytest.raises(ModelPackageError, match="already exists"):
        write_package(m1_package, metadata(), {"model": ("model.pt", m1_network())})
    with pytest.raises(ValueError, match="relative path"):
        write_package(tmp_path / "x", metadata(), {"model": ("../model.pt", m1_network())})
    with pytest.raises(ModelPackageError, match="labels do not match"):
        write_package(
            tmp_path / "y", metadata(labels=("KRAS",)), {"model": ("model.pt", EfficientNetAttention(5, **M3_ARCH))}
        )


def test_list_reports_broken_packages(m1_package: Path, tmp_path: Path):
    models = tmp_path / "models"
    install_package(m1_package, models)
    broken = models / "broken-1"
    broken.mkdir()
    (broken / "model.toml").write_text('name = "broken"\n')
    (models / ".staging").mkdir()  # hidden folders (interrupted installs) are skipped
    entries = list_packages(models)
    assert [e.name for e in entries] == ["broken-1", "m1-test"]
    assert "model.toml: missing key 'version'" in entries[0].problems
    out = io.StringIO()
    assert models_list(models, out=out) == 1
    assert "missing key 'version'" in out.getvalue()
