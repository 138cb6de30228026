"""Workers on other hosts: ``[jobs.queues]``, ``[worker]``, ``[storage] shared_dir`` and the device a worker picks.

A GPU cannot be had on the test machine: :func:`resolve_device` is given torch's answer
(``cuda_available``) for the GPU cases, and asks torch itself for the CPU case.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pacs_agent.config import settings_from_mapping
from pacs_agent.errors import ConfigError
from pacs_agent.jobs.device import resolve_device


def test_methods_map_to_queues_and_the_rest_goes_to_default() -> None:
    settings = settings_from_mapping({"jobs": {"methods": ["radiomics", "m2"], "queues": {"m2": "gpu"}}})
    assert settings.jobs.queue_for("m2") == "gpu"
    assert settings.jobs.queue_for("radiomics") == "default"


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"jobs": {"queues": {"m9": "gpu"}}}, "[jobs.queues] names unknown method(s) m9"),
        ({"jobs": {"queues": {"m2": "GPU hosts"}}}, "queue name 'GPU hosts'"),
        ({"worker": {"device": "gpu0"}}, "device 'gpu0': auto, cpu or cuda:N"),
        ({"worker": {"queues": ["gpu", "-x"]}}, "queue name '-x'"),
        ({"worker": {"concurrency": 0}}, "concurrency"),
    ],
)
def test_bad_queue_and_worker_settings_are_refused_with_the_reason(section: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        settings_from_mapping(section)
    assert problem in str(refused.value)


def test_shared_dir_holds_the_spool_and_results_and_state_stays_local(tmp_path: Path) -> None:
    local = settings_from_mapping({"storage": {"state_dir": str(tmp_path / "state")}})
    assert local.storage.spool_dir == tmp_path / "state" / "spool"
    shared = settings_from_mapping(
        {"storage": {"state_dir": str(tmp_path / "state"), "shared_dir": str(tmp_path / "nfs")}}
    )
    assert (shared.storage.spool_dir, shared.storage.results_dir) == (
        tmp_path / "nfs" / "spool",
        tmp_path / "nfs" / "results",
    )
    assert shared.storage.state_dir == tmp_path / "state"
    assert settings_from_mapping({"storage": {"shared_dir": ""}}).storage.shared_dir is None


@pytest.fixture
def cuda_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_cpu_hides_every_gpu(cuda_env: None) -> None:
    assert resolve_device("cpu") == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_auto_takes_the_gpu_when_torch_sees_one_else_the_cpu(cuda_env: None) -> None:
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda:0"
    os.environ["CUDA_VISIBLE_DEVICES"] = "2"  # set by pacs-agent-worker@2.service
    assert resolve_device("auto", cuda_available=True) == "cuda:2"


def test_auto_on_this_machine_asks_torch(cuda_env: None) -> None:
    import torch

    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_a_named_gpu_is_shown_alone_or_refused_when_not_usable(cuda_env: None) -> None:
    assert resolve_device("cuda:1", cuda_available=True) == "cuda:1"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    with pytest.raises(ConfigError, match=r"device = 'cuda:3', but torch sees no usable GPU 3"):
        resolve_device("cuda:3", cuda_available=False)
