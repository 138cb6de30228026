"""The console's routes: pages, their JSON twins under ``/api/``, login, and the operator actions.

Every route but ``/login`` and ``/static`` needs a session: pages redirect to the login page,
``/api/`` answers 401. Every POST needs the CSRF token of its form. Actions (retry a job, re-run a
study, requeue dead deliveries) need the operator or admin role, are confirmed on a page of their
own and leave an audit event naming the console user. Each view of a study page (which shows the
patient ID) is an audit event too. Nothing here writes patient data to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference.methods import method_names
from pacs_agent.audit import record_event
from pacs_agent.config import Settings
from pacs_agent.console import charts, data, images, markdown, ruletest
from pacs_agent.console.auth import LOGIN_COOKIE, SESSION_COOKIE, LoginLimiter, Session, Sessions
from pacs_agent.console.users import (
    MIN_PASSWORD_LENGTH,
    User,
    UserError,
    authenticate,
    change_password,
    check_name,
    find_user,
)
from pacs_agent.db import Database
from pacs_agent.events_cli import EVENT_KINDS, LEVELS, EventQuery, parse_since
from pacs_agent.jobs.queue import RetryRefused, retry_job
from pacs_agent.pause import pause_processing, resume_processing
from pacs_agent.send.cli import retry_deliveries
from pacs_agent.studies.store import retry_study

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
CSP = (
    "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """ASGI middleware: the strict Content-Security-Policy and friends on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Add the headers to the response start message."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


PEER = "pacs_agent.peer"
"""Scope key of the TCP peer's address (``client`` may be the address a trusted proxy forwarded)."""


class ForwardedFor:
    """ASGI middleware: keep the TCP peer in the scope; believe ``X-Forwarded-For`` from trusted proxies only.

    The trusted proxies are ``[console] trusted_proxies``, by default 127.0.0.1 and ::1. The client
    address then becomes the last address the proxy appended (login rate limit, audit events).
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.console = settings.console

    def trusted(self, peer: str) -> bool:
        """True when ``peer`` is a trusted reverse proxy."""
        if self.console.trusted_proxies:
            return self.console.proxy_trusted(peer)
        return peer in ("127.0.0.1", "::1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Record the peer, and take the forwarded client address when the peer may give it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope = dict(scope)
        client = scope.get("client")
        peer = client[0] if client else ""
        scope[PEER] = peer
        if self.trusted(peer):
            forwarded = [v for k, v in scope.get("headers", []) if k == b"x-forwarded-for"]
            hops = [h.strip() for h in b",".join(forwarded).decode("latin-1").split(",") if h.strip()]
            if hops:
                scope["client"] = (hops[-1][:64], 0)
        await self.app(scope, receive, send)


@dataclass
class Context:
    """What every handler needs: settings, database, session signer, login limiter, templates."""

    settings: Settings
    db: Database
    sessions: Sessions
    limiter: LoginLimiter
    templates: Jinja2Templates

    @property
    def root(self) -> str:
        """Path prefix of every link (``[console] base_url``'s path)."""
        return self.settings.console.root_path


Handler = Callable[[Request, "Context", User, Session], Awaitable[Response]]


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _render(ctx: Context, request: Request, name: str, status: int = 200, **values: Any) -> Response:
    return ctx.templates.TemplateResponse(request, name, {"root": ctx.root, **values}, status_code=status)


def _message(
    ctx: Context, request: Request, user: User | None, session: Session | None, title: str, text: str, status: int
) -> Response:
    return _render(
        ctx, request, "message.html", status, user=user, csrf=session.csrf if session else "", title=title, text=text
    )


def _proxy_user(ctx: Context, request: Request) -> tuple[User, Session] | None:
    """The user the trusted reverse proxy names in ``[console] trusted_proxy_header``, if any.

    The header counts only when the TCP peer is one of ``[console] trusted_proxies``; the user must
    be a local console user (their role) unless ``[console] proxy_default_role`` is set.
    """
    console = ctx.settings.console
    if not console.trusted_proxy_header or not console.proxy_trusted(request.scope.get(PEER, "")):
        return None
    name = request.headers.get(console.trusted_proxy_header, "").strip()
    if not name:
        return None
    with ctx.db.read_session() as db_session:
        user = find_user(db_session, name)
    if user is None:
        try:
            check_name(name)
        except UserError:
            return None
        if not console.proxy_default_role:
            return None
        user = User(name, console.proxy_default_role)
    return user, ctx.sessions.sso(user.name)


def _authenticated(ctx: Context, request: Request) -> tuple[User, Session] | None:
    by_proxy = _proxy_user(ctx, request)
    if by_proxy is not None:
        return by_proxy
    session = ctx.sessions.read(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    with ctx.db.read_session() as db_session:
        user = find_user(db_session, session.user)
    return None if user is None else (user, session)


def guarded(
    ctx: Context, handler: Handler, *, api: bool = False, with_one_time_password: bool = False
) -> Callable[[Request], Awaitable[Response]]:
    """``handler`` for logged-in users only (pages redirect to the login page, ``/api/`` answers 401).

    A POST must also carry the session's CSRF token in its form field ``csrf`` (else 403). A user
    who logged in with a one-time password reaches only the password form and logout
    (``with_one_time_password``) until they have chosen their own password.
    """

    async def endpoint(request: Request) -> Response:
        found = _authenticated(ctx, request)
        if found is None:
            if api:
                return JSONResponse({"error": "login required"}, status_code=401)
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"{ctx.root}/login?next={quote(target)}", status_code=303)
        user, session = found
        if user.must_change_password and not session.sso and not with_one_time_password:
            if api:
                return JSONResponse({"error": "choose your own password first (the console's password page)"}, 403)
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"{ctx.root}/password?next={quote(target)}", status_code=303)
        if request.method == "POST":
            form = await request.form()
            token = form.get("csrf")
            if not ctx.sessions.csrf_ok(session, token if isinstance(token, str) else None):
                return _message(
                    ctx,
                    request,
                    user,
                    session,
                    "Refused",
                    "The form's security token is missing or out of date; reload the page and try again.",
                    403,
                )
        return await handler(request, ctx, user, session)

    return endpoint


# -- login ------------------------------------------------------------------------------------


async def login_page(request: Request, ctx: Context, *, error: str = "", status: int = 200) -> Response:
    """The login form, with a fresh pre-login CSRF token (cookie + hidden field)."""
    cookie, token = ctx.sessions.login_token()
    next_url = request.query_params.get("next", "")
    response = _render(ctx, request, "login.html", status, user=None, login_token=token, next=next_url, error=error)
    response.set_cookie(
        LOGIN_COOKIE, cookie, httponly=True, samesite="strict", secure=ctx.settings.console.secure_cookies, path="/"
    )
    return response


def _safe_next(ctx: Context, value: str) -> str:
    # only a local path (never //host or a scheme): no open redirect
    if value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return ctx.root + value
    return f"{ctx.root}/"


async def login_submit(request: Request, ctx: Context) -> Response:
    """Check the token, the rate limit and the password; start a session."""
    form = await request.form()
    address = _client(request)
    token = form.get("login_token")
    if not ctx.sessions.login_token_ok(request.cookies.get(LOGIN_COOKIE), token if isinstance(token, str) else None):
        return await login_page(request, ctx, error="The login form expired; please try again.", status=403)
    wait = ctx.limiter.blocked_for(address)
    if wait:
        return await login_page(
            request, ctx, error=f"Too many failed logins from your address; try again in {wait:.0f} s.", status=429
        )
    name, password = form.get("username"), form.get("password")
    user = None
    with ctx.db.session() as db_session, db_session.begin():
        if isinstance(name, str) and isinstance(password, str) and name and password:
            user = authenticate(db_session, name, password)
        if user is None:
            record_event(
                db_session,
                "console_login_failed",
                level="WARNING",
                peer=address,
                detail=f"user {str(name)[:64]!r}",
                log=False,
            )
        else:
            record_event(db_session, "console_login", peer=address, detail=f"user {user.name} ({user.role})", log=False)
    if user is None:
        ctx.limiter.failed(address)
        return await login_page(request, ctx, error="Unknown user or wrong password.", status=401)
    ctx.limiter.succeeded(address)
    cookie, _ = ctx.sessions.issue(user.name)
    next_value = form.get("next")
    response = RedirectResponse(_safe_next(ctx, next_value if isinstance(next_value, str) else ""), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(ctx.sessions.max_age_seconds),
        httponly=True,
        samesite="strict",
        secure=ctx.settings.console.secure_cookies,
        path="/",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


async def logout(request: Request, ctx: Context, user: User, session: Session) -> Response:
    """End the session (the cookie is dropped)."""
    response = RedirectResponse(f"{ctx.root}/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def password_page(request: Request, ctx: Context, user: User, session: Session) -> Response:
    """GET: the form to change one's password; POST: change it (the current one must be right)."""
    if session.sso:
        return _message(
            ctx,
            request,
            user,
            session,
            "Not here",
            "You are logged in by the single sign-on; its password is not ours.",
            404,
        )
    error, status = "", 200
    next_url = request.query_params.get("next", "")
    if request.method == "POST":
        form = await request.form()
        current, new, again = (str(form.get(key) or "") for key in ("current", "new", "again"))
        next_url = str(form.get("next") or "")
        if new != again:
            error, status = "The two new passwords differ.", 400
        elif ctx.limiter.blocked_for(_client(request)):
            error, status = "Too many failed attempts from your address; try again later.", 429
        else:
            try:
                with ctx.db.session() as db_session, db_session.begin():
                    change_password(db_session, user.name, current, new)
                    record_event(
                        db_session,
                        "console_password_changed",
                        peer=_client(request),
                        detail=f"user {user.name}"
                        + (" (one-time password replaced)" if user.must_change_password else ""),
                        log=False,
                    )
            except UserError as exc:
                if "current password" in str(exc):
                    ctx.limiter.failed(_client(request))
                error, status = f"Not changed: {exc}.", 400
            else:
                return RedirectResponse(_safe_next(ctx, next_url), status_code=303)
    return _render(
        ctx,
        request,
        "password.html",
        status,
        user=user,
        csrf=session.csrf,
        next=next_url,
        error=error,
        min_length=MIN_PASSWORD_LENGTH,
    )


# -- pages ------------------------------------------------------------------------------------


def _page(
    api: bool, ctx: Context, request: Request, user: User, session: Session, name: str, payload: Any, **extra: Any
) -> Response:
    if api:
        return JSONResponse(payload)
    return _render(ctx, request, name, user=user, csrf=session.csrf, data=payload, **extra)


def overview_handler(api: bool) -> Handler:
    """``/`` and ``/api/overview``."""

    async def handler(request: Request, ctx: Context, user: User, session: Session) -> Response:
        payload = data.overview(ctx.db, ctx.settings)
        return _page(
            api,
            ctx,
            request,
            user,
            session,
            "overview.html",
            payload,
            instances_chart=charts.hourly(payload["instances_per_hour"], ("instances",)),
            failures_chart=charts.hourly(payload["delivery_failures_per_hour"], ("retry", "dead")),
            durations_chart=charts.durations(payload["job_durations"]),
            nav="overview",
        )

    return handler


def _day(params: Any, key: str, problems: list[str]) -> date | None:
    value = (params.get(key) or "").strip()
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        problems.append(f"{key}: {value[:40]!r} is not a date (YYYY-MM-DD)")
        return None


def studies_handler(api: bool) -> Handler:
    """``/studies`` and ``/api/studies``, filtered by the query parameters.

    ``state``, ``q`` (UID or accession), ``from`` / ``to`` (UTC days of arrival, YYYY-MM-DD, both
    included), ``method`` and ``calling_ae``; a bad value answers 400 with the reason.
    """

    async def handler(request: Request, ctx: Context, user: User, session: Session) -> Response:
        params = request.query_params
        problems: list[str] = []
        state = params.get("state") or None
        search = params.get("q") or None
        received_from, received_to = _day(params, "from", problems), _day(params, "to", problems)
        method = (params.get("method") or "").strip() or None
        calling_ae = (params.get("calling_ae") or "").strip() or None
        if state and state not in data.STUDY_STATES:
            problems.append(f"state: {state[:40]!r} is none of {', '.join(data.STUDY_STATES)}")
        rows = (
            []
            if problems
            else data.studies(
                ctx.db,
                state=state,
                search=search,
                received_from=received_from,
                received_to=received_to,
                method=method,
                calling_ae=calling_ae,
            )
        )
        if api:
            if problems:
                return JSONResponse({"error": "; ".join(problems)}, status_code=400)
            return JSONResponse(rows)
        return _render(
            ctx,
            request,
            "studies.html",
            400 if problems else 200,
            user=user,
            csrf=session.csrf,
            data=rows,
            problems=problems,
            states=data.STUDY_STATES,
            methods=method_names(),
            calling_aes=data.calling_ae_titles(ctx.db),
            filters={
                "state": state or "",
                "q": search or "",
                "from": params.get("from", ""),
                "to": params.get("to", ""),
                "method": method or "",
                "calling_ae": calling_ae or "",
            },
            nav="studies",
        )

    return handler


def study_handler(api: bool) -> Handler:
    """``/studies/{uid}`` and ``/api/studies/{uid}``: each view is an audit event (who, which study)."""

    async def handler(request: Request, ctx: Context, user: User, session: Session) -> Response:
        uid = request.path_params["uid"]
        page = data.study_page(ctx.db, ctx.settings, uid)
        if page is None:
            if api:
                return JSONResponse({"error": "no such study"}, status_code=404)
            return _message(
                ctx, request, user, session, "Not found", "There is no study with this Study Instance UID.", 404
            )
        with ctx.db.session() as db_session, db_session.begin():
            record_event(
                db_session,
                "console_study_viewed",
                study_instance_uid=uid,
                peer=_client(request),
                detail=f"by {user.name}" + (" (api)" if api else ""),
                log=False,
            )
        srs = []
        for result in page["result_objects"]:
            if result["kind"] == "sr":
                found = data.result_file(ctx.db, ctx.settings, uid, result["id"])
                try:
                    text = images.sr_text(found[1]) if found else "(no file)"
                except images.ResultUnreadable as exc:
                    text = str(exc)
                srs.append({**result, "text": text})
        if api:
            return JSONResponse({**page, "sr_text": {r["sop_instance_uid"]: r["text"] for r in srs}})
        viewer = ctx.settings.console.viewer_url
        viewer_link = viewer.format(study_instance_uid=quote(uid, safe="")) if viewer else ""
        return _render(
            ctx,
            request,
            "study.html",
            user=user,
            csrf=session.csrf,
            data=page,
            srs=srs,
            viewer_link=viewer_link,
            nav="studies",
        )

    return handler


async def result_png(request: Request, ctx: Context, user: User, session: Session) -> Response:
    """A Secondary Capture result of a study as PNG (from the stored object)."""
    uid, result_id = request.path_params["uid"], request.path_params["result_id"]
    found = data.result_file(ctx.db, ctx.settings, uid, result_id)
    if found is None or found[0] == "sr":
        return Response("no such image", status_code=404, media_type="text/plain")
    try:
        body = images.png(found[1])
    except images.ResultUnreadable as exc:
        return Response(str(exc), status_code=404, media_type="text/plain")
    return Response(body, media_type="image/png")


def queue_handler(api: bool) -> Handler:
    """``/queue`` and ``/api/queue`` (``?state=``; default: every job not done)."""

    async def handler(request: Request, ctx: Context, user: User, session: Session) -> Response:
        state = request.query_params.get("state") or None
        rows = data.queue(ctx.db, state=state if state in data.JOB_STATES else None)
        return _page(
            api, ctx, request, user, session, "queue.html", rows, states=data.JOB_STATES, state=state or "", nav="queue"
        )

    return handler


def deliveries_handler(api: bool) -> Handler:
    """``/deliveries`` and ``/api/deliveries`` (``?state=``, ``?destination=``)."""

    async def handler(request: Request, ctx: Context, user: User, session: Session) -> Response:
        state = request.query_params.get("state") or None
        destination = request.query_params.get("destination") or None
        rows = data.deliveries(ctx.db, state=state if state in data.DELIVERY_STATES else None, destination=destination)
        names = [d.name for d in ctx.settings.destinations]
        return _page(
            api,
            ctx,
            request,
            user,
            session,
            "deliveries.html",
            rows,
            states=data.DELIVERY_STATES,
            state=state or "",
            destinations=names,
            destination=destination or "",
            nav="deliveries",
        )

    return handler


def events_handler(api: bool) -> Handler:
    """``/events`` and ``/api/events``: the filters of ``pacs-agent events`` (since, study, kind, job, level, limit)."""

    async def handler(request: Request, ctx: Context, user: User, session: Session) -> Response:
        params = request.query_params
        problems = []
        since = None
        if params.get("since"):
            try:
                since = parse_since(params["since"])
            except ValueError as exc:
                problems.append(f"since: {exc}")
        job = params.get("job", "")
        limit = params.get("limit", "")
        level = (params.get("level") or "").upper()
        kinds = tuple(k.strip() for k in params.getlist("kind") for k in k.split(",") if k.strip())
        query = EventQuery(
            since=since,
            study_instance_uid=params.get("study") or None,
            kinds=kinds,
            job_id=int(job) if job.isdigit() else None,
            min_level=level if level in LEVELS else None,
            limit=min(int(limit), 1000) if limit.isdigit() and int(limit) > 0 else 100,
        )
        rows = data.events(ctx.db, query)
        if api:
            return JSONResponse({"events": rows, "problems": problems}, status_code=400 if problems else 200)
        return _render(
            ctx,
            request,
            "events.html",
            user=user,
            csrf=session.csrf,
            data=rows,
            problems=problems,
            params=params,
            kinds=EVENT_KINDS,
            levels=LEVELS,
            nav="events",
        )

    return handler


def models_handler(api: bool) -> Handler:
    """``/models`` and ``/api/models``."""

    async def handler(request: Request, ctx: Context, user: User, session: Session) -> Response:
        return _page(api, ctx, request, user, session, "models.html", data.models(ctx.settings), nav="models")

    return handler


def model_report_handler(api: bool) -> Handler:
    """``/models/{index}/{name}/report`` and its ``/api/`` twin: a package's training report (report.md).

    The page renders the Markdown safely (:mod:`.markdown`) with the report's ROC plots; the API
    returns the Markdown text.
    """

    async def handler(request: Request, ctx: Context, user: User, session: Session) -> Response:
        index, name = request.path_params["index"], request.path_params["name"]
        package = data.model_package(ctx.settings, index, name)
        body = data.report_file(package, "report.md") if package is not None else None
        if package is None or body is None:
            if api:
                return JSONResponse({"error": "no such package or it has no training report"}, status_code=404)
            return _message(
                ctx, request, user, session, "Not found", "No such model package, or it has no training report.", 404
            )
        text = body.decode("utf-8", errors="replace")
        if api:
            return JSONResponse({"package": name, "markdown": text})
        base = f"{ctx.root}/models/{index}/{quote(name, safe='')}/report/"

        images = data.report_images(package)
        shown: list[str] = []

        def image_url(file: str) -> str | None:
            if file not in images:
                return None
            shown.append(file)
            return base + file

        report = markdown.render(text, image_url)
        return _render(
            ctx,
            request,
            "model_report.html",
            user=user,
            csrf=session.csrf,
            package=name,
            report=report,
            more_images=[(file, base + file) for file in images if file not in shown],
            nav="models",
        )

    return handler


async def model_report_image(request: Request, ctx: Context, user: User, session: Session) -> Response:
    """A PNG of a package's training report (e.g. its ROC plot), only by a plain file name in ``report/``."""
    index, name, file = request.path_params["index"], request.path_params["name"], request.path_params["file"]
    package = data.model_package(ctx.settings, index, name)
    body = data.report_file(package, file) if package is not None and file.endswith(".png") else None
    if body is None:
        return Response("no such image", status_code=404, media_type="text/plain")
    return Response(body, media_type="image/png")


def config_handler(api: bool) -> Handler:
    """``/config`` and ``/api/config``: effective settings (secrets redacted) and ``config check`` problems."""

    async def handler(request: Request, ctx: Context, user: User, session: Session) -> Response:
        return _page(api, ctx, request, user, session, "config.html", data.configuration(ctx.settings), nav="config")

    return handler


def rules_handler(api: bool) -> Handler:
    """``/rules`` and ``/api/rules``: the rule tester (GET: the form; POST: run it).

    POST fields: ``study`` (a received Study Instance UID) or ``file`` (a zip of DICOM files or
    headers), and ``rules`` (TOML of ``[routing]`` / ``[response]``; empty: the node's rules).
    Nothing is saved; each run is an audit event.
    """

    async def handler(request: Request, ctx: Context, user: User, session: Session) -> Response:
        current = ruletest.rules_toml(ctx.settings)
        form = await request.form() if request.method == "POST" else None
        study = str((form or request.query_params).get("study") or "").strip()
        text = str(form.get("rules") or "") if form is not None else ""
        outcome: dict[str, Any] | None = None
        problem = ""
        status = 200
        if form is not None:
            upload = form.get("file")
            has_file = isinstance(upload, UploadFile) and bool(upload.filename) and bool(upload.size)
            try:
                settings = ruletest.settings_with_rules(ctx.settings, text) if text.strip() else ctx.settings
                edited = (settings.routing, settings.response) != (ctx.settings.routing, ctx.settings.response)
                if has_file:
                    assert isinstance(upload, UploadFile)
                    outcome = await run_in_threadpool(ruletest.try_upload, ctx.db, settings, upload.file)
                    what = f"an uploaded zip ({outcome['files']} file(s))"
                elif study:
                    found = await run_in_threadpool(ruletest.try_received, ctx.db, settings, study)
                    if found is None:
                        raise ruletest.RuleTestError("there is no received study with this Study Instance UID")
                    outcome = {"studies": [found], "files": None, "skipped_files": []}
                    what = "a received study"
                else:
                    raise ruletest.RuleTestError("choose a received study or upload a zip of its DICOM files")
            except ruletest.RuleTestError as exc:
                problem, status = str(exc), 400
            else:
                outcome["rules"] = "edited (not saved)" if edited else "the node's"
                with ctx.db.session() as db_session, db_session.begin():
                    record_event(
                        db_session,
                        "console_rules_tested",
                        study_instance_uid=study if not has_file else None,
                        peer=_client(request),
                        detail=f"by {user.name}: {what} under {outcome['rules']} rules",
                        log=False,
                    )
        if form is not None:
            await form.close()  # the uploaded zip's temporary file
        if api:
            if problem:
                return JSONResponse({"error": problem}, status_code=status)
            return JSONResponse(outcome if outcome is not None else {"rules": current})
        return _render(
            ctx,
            request,
            "rules.html",
            status,
            user=user,
            csrf=session.csrf,
            study=study,
            rules=text or current,
            studies=data.studies(ctx.db, limit=200),
            outcome=outcome,
            problem=problem,
            nav="rules",
        )

    return handler


# -- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One operator action: what the confirmation page asks, and how it is done."""

    title: str
    fields: tuple[str, ...]


ACTIONS = {
    "retry-job": Action("Retry job {job_id}", ("job_id",)),
    "rerun-study": Action("Re-run study {study}", ("study",)),
    "requeue-deliveries": Action("Requeue the dead deliveries{of}", ("destination",)),
    "pause-processing": Action("Pause processing of new studies", ("reason",)),
    "resume-processing": Action("Resume processing", ()),
}


def _do(ctx: Context, name: str, values: dict[str, str], operator: str) -> tuple[str, str | None]:
    """Run an action; (message, study UID it concerns). ``values`` holds the action's fields."""
    if name == "retry-job":
        if not values["job_id"].isdigit():
            raise RetryRefused(f"{values['job_id']!r} is not a job number")
        with ctx.db.session() as session, session.begin():
            message = retry_job(session, int(values["job_id"]), operator=operator)
        return message, None
    if name == "rerun-study":
        with ctx.db.session() as session, session.begin():
            message = retry_study(session, values["study"], operator=operator)
        return message, values["study"]
    if name in ("pause-processing", "resume-processing"):
        with ctx.db.session() as session, session.begin():
            if name == "pause-processing":
                return pause_processing(session, by=operator, reason=values["reason"]), None
            return resume_processing(session, by=operator), None
    report = retry_deliveries(ctx.db, destination=values["destination"] or None)
    return f"requeued {len(report.requeued)} dead delivery(ies)", None


def action_handler(name: str) -> Handler:
    """``POST /actions/NAME``: operators only; a confirmation page first; an audit event naming the user."""
    action = ACTIONS[name]

    async def handler(request: Request, ctx: Context, user: User, session: Session) -> Response:
        form = await request.form()
        values = {key: str(form.get(key) or "").strip() for key in action.fields}
        title = action.title.format(
            job_id=values.get("job_id", ""),
            study=values.get("study", ""),
            of=f" to {values['destination']}" if values.get("destination") else "",
        )
        if not user.can_act:
            with ctx.db.session() as db_session, db_session.begin():
                record_event(
                    db_session,
                    "console_action_refused",
                    level="WARNING",
                    peer=_client(request),
                    detail=f"{user.name} ({user.role}) may not: {title}",
                    log=False,
                )
            return _message(
                ctx,
                request,
                user,
                session,
                "Not allowed",
                f"Your role ({user.role}) may look but not act; an operator or admin can: {title}.",
                403,
            )
        if form.get("confirmed") != "yes":
            return _render(
                ctx, request, "confirm.html", user=user, csrf=session.csrf, title=title, action=name, values=values
            )
        operator = f"console user {user.name}"
        try:
            message, study = _do(ctx, name, values, operator)
        except RetryRefused as exc:
            return _message(ctx, request, user, session, "Not done", str(exc), 409)
        with ctx.db.session() as db_session, db_session.begin():
            record_event(
                db_session,
                "console_action",
                study_instance_uid=study,
                peer=_client(request),
                detail=f"by {user.name} ({user.role}): {title}: {message}",
                log=False,
            )
        return _message(ctx, request, user, session, "Done", message, 200)

    return handler


# -- the application --------------------------------------------------------------------------


def create_app(settings: Settings, db: Database, secret: bytes, limiter: LoginLimiter | None = None) -> Starlette:
    """The console as an ASGI application over ``db`` (sessions signed with ``secret``)."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["clock"] = lambda iso: (iso or "-")[:19].replace("T", " ")
    templates.env.globals["now"] = lambda: datetime.now(UTC).isoformat(timespec="seconds")
    ctx = Context(
        settings, db, Sessions(secret, settings.console.session_hours * 3600), limiter or LoginLimiter(), templates
    )

    async def login_get(request: Request) -> Response:
        if _authenticated(ctx, request) is not None:
            return RedirectResponse(f"{ctx.root}/", status_code=303)
        return await login_page(request, ctx)

    async def login_post(request: Request) -> Response:
        return await login_submit(request, ctx)

    pages: list[tuple[str, Callable[[bool], Handler]]] = [
        ("/", overview_handler),
        ("/studies", studies_handler),
        ("/studies/{uid}", study_handler),
        ("/queue", queue_handler),
        ("/deliveries", deliveries_handler),
        ("/events", events_handler),
        ("/models", models_handler),
        ("/config", config_handler),
    ]
    routes: list[Route | Mount] = [
        Route("/login", login_get, methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/logout", guarded(ctx, logout, with_one_time_password=True), methods=["POST"]),
        Route("/password", guarded(ctx, password_page, with_one_time_password=True), methods=["GET", "POST"]),
        Route("/studies/{uid}/results/{result_id:int}.png", guarded(ctx, result_png)),
        Route("/models/{index:int}/{name}/report", guarded(ctx, model_report_handler(False))),
        Route("/api/models/{index:int}/{name}/report", guarded(ctx, model_report_handler(True), api=True)),
        Route("/models/{index:int}/{name}/report/{file}", guarded(ctx, model_report_image)),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    for path, make in pages:
        routes.append(Route(path, guarded(ctx, make(False))))
        api_path = "/api/overview" if path == "/" else f"/api{path}"
        routes.append(Route(api_path, guarded(ctx, make(True), api=True)))
    routes.append(Route("/rules", guarded(ctx, rules_handler(False)), methods=["GET", "POST"]))
    routes.append(Route("/api/rules", guarded(ctx, rules_handler(True), api=True), methods=["GET", "POST"]))
    for name in ACTIONS:
        routes.append(Route(f"/actions/{name}", guarded(ctx, action_handler(name)), methods=["POST"]))
    app = Starlette(routes=routes)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(ForwardedFor, settings=settings)
    return app
