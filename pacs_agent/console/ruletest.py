"""The rule tester: what the routing rules decide for a study, and why, without changing anything.

A received study (or a zip of DICOM files / headers uploaded in the page) is put through the very
code the scheduler runs: :func:`pacs_agent.studies.scheduler.snapshot_study` and
:func:`pacs_agent.studies.readiness.decide` (CT series, segmentation, tumour structures),
:func:`pacs_agent.studies.scheduler.applicable_methods` (which methods) and
:func:`pacs_agent.routing.pairing.choose_baseline` over the node's stored studies (which baseline
the response method would pair). The rules are the node's, or the ``[routing]`` (and
``[response]``) tables edited in the page, validated like the configuration file; nothing is
saved, no job is scheduled, and the node's database is only read (an uploaded study is recorded
in a throw-away database of its own, the way the receiver records one).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.config import Settings, settings_from_mapping
from pacs_agent.db import Database
from pacs_agent.db.tables import Job, Study, utcnow
from pacs_agent.errors import PacsAgentError
from pacs_agent.receive.header import HeaderError, read_header
from pacs_agent.routing.methods import region_evidence
from pacs_agent.routing.pairing import RESPONSE_METHOD, choose_baseline, local_candidates, parse_da
from pacs_agent.studies.readiness import decide
from pacs_agent.studies.scheduler import applicable_methods, chosen_series_text, readiness_rules, snapshot_study
from pacs_agent.studies.store import record_instance

EDITABLE_SECTIONS = ("routing", "response")
MAX_UPLOAD_BYTES = 2 * 1024**3
MAX_MEMBERS = 20_000


class RuleTestError(PacsAgentError):
    """The edited rules or the uploaded zip cannot be used; the message says why."""


# -- the rules as TOML ------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # a literal string keeps regular expressions readable ('\bPV\b'); JSON escapes are valid TOML otherwise
        if "'" not in value and not any(ord(c) < 32 or ord(c) == 127 for c in value):
            return f"'{value}'"
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _table(name: str, data: dict[str, Any], out: list[str]) -> None:
    out.append(f"[{name}]")
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            out.append(f"{_key(key)} = {_value(value)}")
    for key, value in tables:
        out.append("")
        _table(f"{name}.{_key(key)}", value, out)


def rules_toml(settings: Settings) -> str:
    """The node's ``[routing]`` and ``[response]`` tables as TOML (what the page's text box starts with)."""
    dumped = json.loads(settings.model_dump_json())
    out: list[str] = []
    for section in EDITABLE_SECTIONS:
        if out:
            out.append("")
        _table(section, dumped[section], out)
    return "\n".join(out) + "\n"


def settings_with_rules(settings: Settings, text: str) -> Settings:
    """``settings`` with the ``[routing]`` / ``[response]`` tables of ``text`` in place of its own.

    A table given replaces the node's whole table (a key left out takes its default, as in the
    configuration file); a table not given stays as configured.

    Raises
    ------
    RuleTestError
        ``text`` is not TOML, holds other tables, or a value the configuration would refuse.
    """
    try:
        edited = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleTestError(f"the rules are not valid TOML: {exc}") from None
    other = sorted(set(edited) - set(EDITABLE_SECTIONS))
    if other:
        raise RuleTestError(
            f"only the tables {', '.join(f'[{s}]' for s in EDITABLE_SECTIONS)} can be tried here; "
            f"remove {', '.join(other)}"
        )
    data = json.loads(settings.model_dump_json())
    data.update(edited)
    try:
        return settings_from_mapping(data)
    except PacsAgentError as exc:
        raise RuleTestError(f"the rules would be refused by the configuration check: {exc}") from None


# -- one study under the rules ----------------------------------------------------------------


def _loads(text: str | None) -> list[dict[str, Any]]:
    return list(json.loads(text)) if text else []


def _method_lines(
    session: Session, study: Study, decision: Any, settings: Settings
) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    choice = applicable_methods(session, study, decision, settings.jobs.methods, settings)
    text = chosen_series_text(session, study, decision)
    routing = settings.routing
    lines = []
    for method in choice.selected:
        region = routing.method_regions.get(method)
        if region is None:
            why = f"{method} is not tied to a body region ([routing] method_regions): it runs on every study"
        else:
            evidence = region_evidence(text, routing.region_patterns.get(region, ()))
            why = f"{method} is for {region} CT: {evidence}"
        lines.append({"method": method, "runs": True, "reason": why})
    lines += [{"method": m, "runs": False, "reason": why} for m, why in choice.skipped]
    return lines, choice.selected


def _pairing(candidates_session: Session, study: Study, settings: Settings) -> dict[str, Any]:
    followup_date = parse_da(study.study_date)
    if not study.patient_id or followup_date is None:
        missing = "PatientID" if not study.patient_id else "StudyDate"
        return {"baseline": None, "reason": f"the study has no {missing}; it cannot be paired"}
    candidates = [
        c for c in local_candidates(candidates_session, study) if c.study_instance_uid != study.study_instance_uid
    ]
    response = settings.response
    choice = choose_baseline(
        study.study_instance_uid,
        followup_date,
        study.patient_birth_date,
        study.patient_sex,
        candidates,
        window_weeks=response.window_weeks,
        target_weeks=response.target_weeks,
    )
    if choice.candidate is not None:
        return {"baseline": choice.candidate.study_instance_uid, "reason": f"found locally: {choice.reason}"}
    if response.query_sources and settings.sources:
        names = ", ".join(s.name for s in settings.sources)
        return {"baseline": None, "reason": f"none stored here ({choice.reason}); the node would ask {names}"}
    return {"baseline": None, "reason": choice.reason}


def try_study(
    session: Session,
    study: Study,
    settings: Settings,
    *,
    spool_dir: Path,
    candidates_session: Session | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """What ``settings``' rules decide for ``study``, with the reason of every choice.

    The study is taken as quiet (its quiet period over). ``candidates_session`` is where baseline
    candidates are looked for (default ``session``). The caller rolls ``session`` back: reading a
    segmentation for the first time caches its summary in its Instance row, nothing else is written.
    """
    rules = readiness_rules(settings)
    snapshot = snapshot_study(session, study, spool_dir)
    quiet = snapshot.last_received_at + timedelta(seconds=rules.quiet_seconds)
    decision = decide(snapshot, max(now or utcnow(), quiet), rules)
    series_notes = {n.series_instance_uid: n for n in decision.series_notes}
    series = [
        {
            "series_instance_uid": s.series_instance_uid,
            "modality": s.modality,
            "instances": s.instance_count,
            "description": s.description,
            "role": series_notes[s.series_instance_uid].role if s.series_instance_uid in series_notes else "",
            "reason": series_notes[s.series_instance_uid].reason if s.series_instance_uid in series_notes else "",
        }
        for s in snapshot.series
    ]
    structures = [
        {
            "segmentation_sop_instance_uid": n.segmentation_sop_instance_uid,
            "number": n.number,
            "label": n.label,
            "role": n.role,
            "reason": n.reason,
            "organ": n.organ,
            "chosen_segmentation": n.segmentation_sop_instance_uid == decision.segmentation_sop_instance_uid,
        }
        for n in decision.structure_notes
    ]
    methods: list[dict[str, Any]] = []
    selected: tuple[str, ...] = ()
    pairing = None
    if decision.state == "ready":
        methods, selected = _method_lines(session, study, decision, settings)
        if RESPONSE_METHOD in selected:
            pairing = _pairing(candidates_session or session, study, settings)
    return {
        "study_instance_uid": study.study_instance_uid,
        "decision": {
            "state": decision.state,
            "reason": decision.reason,
            "ct_series_instance_uid": decision.ct_series_instance_uid,
            "segmentation_sop_instance_uid": decision.segmentation_sop_instance_uid,
            "warnings": list(decision.warnings),
        },
        "series": series,
        "structures": structures,
        "methods": methods,
        "methods_run": list(selected),
        "pairing": pairing,
    }


def recorded(session: Session, study: Study) -> dict[str, Any]:
    """What the node decided when it evaluated the study (to compare with the tester's answer)."""
    jobs = session.execute(select(Job.method).where(Job.study_id == study.id).distinct()).scalars().all()
    return {
        "state": study.state,
        "reason": study.state_reason,
        "ct_series_instance_uid": study.ct_series_instance_uid,
        "segmentation_sop_instance_uid": study.segmentation_sop_instance_uid,
        "methods_run": sorted(jobs),
        "skipped_methods": _loads(study.method_notes),
        "evaluated": study.evaluated_at is not None,
    }


def _differences(result: dict[str, Any], before: dict[str, Any]) -> list[str]:
    if not before["evaluated"]:
        return []
    out = []
    decision = result["decision"]
    if decision["ct_series_instance_uid"] != before["ct_series_instance_uid"]:
        out.append(
            f"CT series: {decision['ct_series_instance_uid'] or 'none'} "
            f"instead of {before['ct_series_instance_uid'] or 'none'}"
        )
    if decision["segmentation_sop_instance_uid"] != before["segmentation_sop_instance_uid"]:
        out.append(
            f"segmentation: {decision['segmentation_sop_instance_uid'] or 'none'} "
            f"instead of {before['segmentation_sop_instance_uid'] or 'none'}"
        )
    now_run = sorted(m for m in result["methods_run"] if m != RESPONSE_METHOD)
    then_run = sorted(m for m in before["methods_run"] if m != RESPONSE_METHOD)
    if now_run != then_run:
        out.append(f"methods: {', '.join(now_run) or 'none'} instead of {', '.join(then_run) or 'none'}")
    return out


def try_received(db: Database, settings: Settings, study_instance_uid: str) -> dict[str, Any] | None:
    """:func:`try_study` of a received study, with what the node recorded and what differs; None if unknown."""
    with db.session() as session:
        try:
            study = session.execute(
                select(Study).where(Study.study_instance_uid == study_instance_uid)
            ).scalar_one_or_none()
            if study is None:
                return None
            result = try_study(session, study, settings, spool_dir=settings.storage.spool_dir)
            before = recorded(session, study)
        finally:
            session.rollback()
    return {**result, "source": "received", "recorded": before, "differences": _differences(result, before)}


# -- an uploaded zip --------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """What a zip held: how many DICOM files were recorded, and the files that were not DICOM."""

    recorded: int
    skipped: list[str]


@contextmanager
def _scratch() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="pacs-agent-ruletest-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ingest(archive: zipfile.ZipFile, spool: Path, db: Database) -> Upload:
    members = [m for m in archive.infolist() if not m.is_dir()]
    if len(members) > MAX_MEMBERS:
        raise RuleTestError(f"the zip holds {len(members)} files; at most {MAX_MEMBERS} are tried")
    if sum(m.file_size for m in members) > MAX_UPLOAD_BYTES:
        raise RuleTestError(f"the zip unpacks to more than {MAX_UPLOAD_BYTES // 1024**3} GB")
    count, skipped = 0, []
    for index, member in enumerate(members):
        target = spool / f"{index:06d}.dcm"  # never the member's own name: no path leaves the scratch folder
        with archive.open(member) as source, target.open("wb") as out:
            shutil.copyfileobj(source, out, 1024 * 1024)
        try:
            header = read_header(target)
        except HeaderError as exc:
            skipped.append(f"{member.filename[:120]}: {exc}")
            target.unlink()
            continue
        with db.session() as session, session.begin():
            record_instance(
                session, header, path=target.name, size_bytes=target.stat().st_size, calling_ae_title="UPLOAD"
            )
        count += 1
    return Upload(count, skipped)


def try_upload(db: Database, settings: Settings, upload: IO[bytes]) -> dict[str, Any]:
    """:func:`try_study` of every study in an uploaded zip of DICOM files (or of their headers).

    The files are recorded as the receiver records them, in a throw-away database; baseline
    candidates for the response method are looked for among the node's stored studies.

    Raises
    ------
    RuleTestError
        Not a zip, too large, or no DICOM file in it.
    """
    with _scratch() as folder:
        spool = folder / "spool"
        spool.mkdir()
        scratch_db = Database(f"sqlite:///{folder / 'tester.db'}")
        try:
            try:
                with zipfile.ZipFile(upload) as archive:
                    ingested = _ingest(archive, spool, scratch_db)
            except (zipfile.BadZipFile, OSError) as exc:
                raise RuleTestError(f"the upload is not a readable zip file ({exc})") from None
            if not ingested.recorded:
                raise RuleTestError(
                    "the zip holds no DICOM file the node would accept"
                    + (f" ({'; '.join(ingested.skipped[:3])})" if ingested.skipped else "")
                )
            results = []
            with scratch_db.session() as session, db.read_session() as node_session:
                quiet = settings.readiness.quiet_seconds + settings.readiness.reference_wait_seconds + 1
                for study in session.execute(select(Study).order_by(Study.study_instance_uid)).scalars():
                    # nothing more will arrive: every wait of the rules is over
                    now = study.last_received_at + timedelta(seconds=quiet)
                    result = try_study(
                        session, study, settings, spool_dir=spool, candidates_session=node_session, now=now
                    )
                    results.append({**result, "source": "upload", "recorded": None, "differences": []})
        finally:
            scratch_db.dispose()
    return {"studies": results, "files": ingested.recorded, "skipped_files": ingested.skipped}
