"""The pairing loop of the scp process: ask the sources for missing baselines and fetch them.

For each pairing in ``query``: C-FIND every ``[[sources]]`` entry, choose the candidate nearest
to ``target_weeks``, mark the pairing ``retrieving`` (so that the baseline, once it arrives and
is ready, completes the pair through the normal readiness path), then C-MOVE it to this node or
C-GET it through the node's own C-STORE handler. Pairings whose baseline does not become ready
in time are failed with the reason.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from pynetdicom import evt
from sqlalchemy import select

from pacs_agent.audit import record_event
from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.db.tables import Pairing, Study, utcnow
from pacs_agent.routing.pairing import (
    Candidate,
    choose_baseline,
    expire_retrievals,
    parse_da,
    update_pairing,
    window_dates,
)
from pacs_agent.routing.retrieve import RetrieveError, find_studies, get_study, move_study

logger = logging.getLogger(__name__)


class PairingAgent:
    """Runs the network side of pairing; :meth:`run_once` is one pass."""

    def __init__(self, settings: Settings, db: Database, on_store: Callable[[evt.Event], int]) -> None:
        self.settings = settings
        self.db = db
        self.on_store = on_store

    def run_once(self) -> int:
        """Query the sources for every pairing waiting for it; returns how many were handled."""
        with self.db.session() as session, session.begin():
            expire_retrievals(session)
            waiting = session.execute(select(Pairing.id).where(Pairing.state == "query")).scalars().all()
        for pairing_id in waiting:
            self._query(pairing_id)
        return len(waiting)

    def _query(self, pairing_id: int) -> None:
        with self.db.session() as session:
            pairing = session.get(Pairing, pairing_id)
            assert pairing is not None
            followup = session.get(Study, pairing.followup_study_id)
            assert followup is not None
            followup_uid, patient_id = followup.study_instance_uid, followup.patient_id or ""
            issuer, birth, sex = followup.issuer_of_patient_id, followup.patient_birth_date, followup.patient_sex
            followup_date = parse_da(followup.study_date)
        if followup_date is None or not patient_id:
            return  # pair_followup only queries studies that have both
        response = self.settings.response
        dates = window_dates(followup_date, response.window_weeks)
        candidates: list[Candidate] = []
        problems: list[str] = []
        for source in self.settings.sources:
            try:
                for match in find_studies(
                    source,
                    calling_ae_title=self.settings.node.ae_title,
                    patient_id=patient_id,
                    issuer_of_patient_id=issuer,
                    dates=dates,
                    timeout=self.settings.delivery.timeout_seconds,
                ):
                    candidates.append(
                        Candidate(
                            match.study_instance_uid,
                            parse_da(match.study_date),
                            match.patient_birth_date,
                            match.patient_sex,
                            source.name,
                        )
                    )
            except RetrieveError as exc:
                problems.append(str(exc))
        choice = choose_baseline(
            followup_uid,
            followup_date,
            birth,
            sex,
            candidates,
            window_weeks=response.window_weeks,
            target_weeks=response.target_weeks,
        )
        with self.db.session() as session, session.begin():
            pairing = session.get(Pairing, pairing_id)
            followup = session.get(Study, pairing.followup_study_id) if pairing else None
            if pairing is None or followup is None or pairing.state != "query":
                return
            if choice.candidate is None:
                failed_everywhere = problems and len(problems) == len(self.settings.sources)
                reason = f"queried {len(self.settings.sources)} source(s): {choice.reason}"
                if problems:
                    reason += f"; problems: {'; '.join(problems)}"
                update_pairing(session, pairing, followup, "failed" if failed_everywhere else "none", reason)
                return
            source = next(s for s in self.settings.sources if s.name == choice.candidate.source)
            minutes = response.retrieve_timeout_minutes
            update_pairing(
                session,
                pairing,
                followup,
                "retrieving",
                f"retrieving from {source.name} by C-{source.retrieve.upper()}: {choice.reason}",
                baseline_study_instance_uid=choice.candidate.study_instance_uid,
                source=source.name,
                deadline=utcnow() + timedelta(minutes=minutes),
            )
        self._retrieve(pairing_id, source.name, choice.candidate.study_instance_uid, followup_uid)

    def _retrieve(self, pairing_id: int, source_name: str, study_uid: str, followup_uid: str) -> None:
        source = next(s for s in self.settings.sources if s.name == source_name)
        timeout = self.settings.response.retrieve_timeout_minutes * 60
        try:
            if source.retrieve == "get":
                outcome = get_study(
                    source,
                    study_uid,
                    calling_ae_title=self.settings.node.ae_title,
                    on_store=self.on_store,
                    timeout=timeout,
                )
            else:
                outcome = move_study(
                    source,
                    study_uid,
                    calling_ae_title=self.settings.node.ae_title,
                    destination_ae_title=self.settings.node.ae_title,
                    timeout=timeout,
                )
        except RetrieveError as exc:
            with self.db.session() as session, session.begin():
                pairing = session.get(Pairing, pairing_id)
                followup = session.get(Study, pairing.followup_study_id) if pairing else None
                if pairing is not None and followup is not None and pairing.state == "retrieving":
                    update_pairing(session, pairing, followup, "failed", str(exc))
            return
        with self.db.session() as session, session.begin():
            record_event(
                session,
                "baseline_retrieved",
                study_instance_uid=followup_uid,
                detail=(
                    f"{study_uid} from {source.name}: {outcome.completed} instance(s) retrieved, "
                    f"{outcome.failed} failed, {outcome.warning} with warnings"
                ),
            )

    def run_forever(self, stop: threading.Event, poll_seconds: float = 2.0) -> None:
        """Loop until ``stop``; errors are logged and the loop goes on."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:
                logger.exception("pairing pass failed; retrying")
            stop.wait(poll_seconds)
