"""The sans-IO core of the Work API clients: one request builder and one response parser.

`WorkAPI` turns each endpoint's arguments into a `Call`: the `httpx.Request` to send and the
parser of its `httpx.Response`. Paths, headers, credentials, body checks and the retry decision
live here once; `WorkClient` and `AsyncWorkClient` only send, and sleep between tries.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import msgspec
from pydantic import BaseModel, ValidationError

from dispatcher import __version__
from dispatcher.workapi.errors import (
    InvalidWorkItem,
    MalformedResponseError,
    MissingCredentialError,
    WorkAPIError,
    describe_body,
    error_from_response,
)
from dispatcher.workapi.models import (
    Heartbeat,
    ListedPage,
    ListedWork,
    Work,
    WorkPage,
    WorkQueueStats,
    check_id,
    dump_metadata,
    id_pattern,
)
from dispatcher.workapi.retry import WAIT_IN_CALL_SECONDS, Backoff, delay_for

__all__ = ["ANTHROPIC_VERSION", "BETA", "POLL_BLOCK_MS_MAX", "Call", "HeartbeatRequests",
           "WorkAPI"]

# What the official Python SDK 2.10.0 sends on every endpoint (its `_constants.py`); the
# service accepts older versions, but a client that speaks like the SDK meets no surprise.
ANTHROPIC_VERSION = "2026-10-21"
BETA = "managed-agents-2026-04-01"
USER_AGENT = f"dispatcher/{__version__}"
# The server takes block_ms in 1..999 and rejects 0; None (parameter omitted) is non-blocking.
POLL_BLOCK_MS_MAX = 999

logger = logging.getLogger("dispatcher.workapi")

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
Parser = Callable[[str, httpx.Response], T]


class Auth(Enum):
    """Which key an endpoint takes (as the official SDK 2.10.0's docstrings say)."""

    # Both kinds travel as `Authorization: Bearer`, as the SDK sends them; one key a request.
    ENVIRONMENT = "environment"
    ORGANISATION = "organisation"
    EITHER = "either"  # the environment key when there is one


# --- responses -------------------------------------------------------------------------------
def _decode_json(endpoint: str, response: httpx.Response, expected: str) -> Any:
    status = response.status_code
    if not response.content:
        raise MalformedResponseError(
            f"{endpoint}: the {status} response has no body; expected {expected}",
            status=status, endpoint=endpoint)
    try:
        return json.loads(response.content)
    except ValueError as exc:
        reason = (f"{exc.msg} (char {exc.pos})" if isinstance(exc, json.JSONDecodeError)
                  else "not UTF-8")
    except RecursionError:
        # The decoder recurses once per nesting level; a hostile body of a few thousand `[` ends
        # it with RecursionError, which is a malformed answer like any other, not a crash.
        reason = "nested too deeply"
    # Outside the `except` and `from None`: a JSONDecodeError keeps the whole body, secret and
    # all, in `.doc`, and must not ride along as the cause or context.
    raise MalformedResponseError(
        f"{endpoint}: the {status} response is not JSON ({describe_body(response)}): "
        f"{reason}; expected {expected}", status=status, endpoint=endpoint) from None


def _validate(endpoint: str, status: int, model: type[M], expected: str, data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # Locations and messages only: pydantic's own text quotes the input, secret included.
        problems = [
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors()[:3]
        ]
        more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        message = (f"{endpoint}: the {status} response is not {expected}: "
                   f"{'; '.join(problems)}{more}")
        if model is Work and isinstance(data, dict):
            raise InvalidWorkItem(message, work_id=_legible_id(data.get("id")), status=status,
                                  endpoint=endpoint) from None
        raise MalformedResponseError(message, status=status, endpoint=endpoint) from None


def _legible_id(value: Any) -> str | None:
    """The id of an item that failed validation, if the id itself is a valid one."""
    try:
        return check_id(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _model(model: type[M], expected: str) -> Parser[M]:
    def parse(endpoint: str, response: httpx.Response) -> M:
        data = _decode_json(endpoint, response, expected)
        return _validate(endpoint, response.status_code, model, expected, data)

    return parse


def _optional_work(endpoint: str, response: httpx.Response) -> Work | None:
    """Poll and stop: a work item, or nothing (204, an empty body, or JSON ``null``)."""
    if response.status_code == 204 or not response.content:
        return None
    data = _decode_json(endpoint, response, "a work item or null")
    if data is None:
        return None
    return _validate(endpoint, response.status_code, Work, "a work item or null", data)


def _page(endpoint: str, response: httpx.Response) -> WorkPage:
    """A list page; an item in it that fails validation is left out and logged by its id, so
    one unreadable item does not hide every other one (the stop bridge reads these pages)."""
    expected = "a page of work items"
    data = _decode_json(endpoint, response, expected)
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return _validate(endpoint, response.status_code, WorkPage, expected, data)
    kept = []
    for item in items:
        try:
            kept.append(_validate(endpoint, response.status_code, Work, "a work item", item))
        except InvalidWorkItem as exc:
            logger.warning("invalid work item work_id=%s skipped in a list page: %s",
                           exc.work_id or "unreadable", exc,
                           extra={"action": "invalid work item", "work_id": exc.work_id})
    return _validate(endpoint, response.status_code, WorkPage, expected, {**data, "data": kept})


class _ListedFields(msgspec.Struct):
    """What a page read for its stops is decoded into: the other fields of its items are
    skipped unread, in C."""

    data: list[ListedWork]
    next_page: str | None = None


_LISTED = msgspec.json.Decoder(_ListedFields)
# A page's ids, one a line, each as `check_id` takes it: one match a page, not one an item.
_LISTED_IDS = re.compile(rf"(?:{id_pattern()}\n)*{id_pattern()}")


def _listed_page(endpoint: str, response: httpx.Response) -> ListedPage:
    """A list page read for its items' stop fields only (`ListedWork`); an item whose id, state
    or stop request is unreadable is left out and logged by its id, as in `_page`.

    A sweep reads every held item each second, and the standard library's parser spent about
    6 µs an item on fields nobody reads: a page whose every item reads well is decoded for
    these fields alone (`_listed_whole`, about a tenth of it); any other page is read item by
    item (`_listed_items`), so one bad item costs only itself."""
    whole = _listed_whole(response.content)
    return whole if whole is not None else _listed_items(endpoint, response)


def _listed_items(endpoint: str, response: httpx.Response) -> ListedPage:
    """A list page read item by item: each bad item left out and logged."""
    data = _decode_json(endpoint, response, "a page of work items")
    items = data.get("data") if isinstance(data, dict) else None
    next_page = data.get("next_page") if isinstance(data, dict) else None
    if not isinstance(items, list) or not isinstance(next_page, str | None):
        what = "data: Input should be a valid list" if not isinstance(items, list) else (
            "next_page: Input should be a valid string")
        raise MalformedResponseError(
            f"{endpoint}: the {response.status_code} response is not a page of work items: "
            f"{what}", status=response.status_code, endpoint=endpoint)
    kept = []
    for item in items:
        listed = _listed(item)
        if isinstance(listed, ListedWork):
            kept.append(listed)
            continue
        work_id = _legible_id(item.get("id")) if isinstance(item, dict) else None
        logger.warning("invalid work item work_id=%s skipped in a list page: %s: %s",
                       work_id or "unreadable", endpoint, listed,
                       extra={"action": "invalid work item", "work_id": work_id})
    return ListedPage(kept, next_page or None)


def _listed_whole(body: bytes) -> ListedPage | None:
    """The page if every item's stop fields read well, else None (read it item by item). It
    takes only what the item-by-item reading would give the same: the body must be UTF-8 (as
    `json.loads` wants it, which would refuse the page otherwise), and a lone surrogate, NaN or
    a nesting too deep sends the page to it. One difference: a number of over 4,300 digits in
    a field nobody reads is skipped here, where `json.loads` refuses the whole page."""
    try:
        page = _LISTED.decode(body.decode())
    except (UnicodeDecodeError, msgspec.DecodeError, RecursionError):
        return None
    if page.data and not _LISTED_IDS.fullmatch("\n".join([w.id for w in page.data])):
        return None
    return ListedPage(page.data, page.next_page or None)


def _listed(item: Any) -> ListedWork | str:
    """The item's stop fields, or what is wrong with them."""
    if not isinstance(item, dict):
        return "not an object"
    work_id = _legible_id(item.get("id"))
    state, stop_requested_at = item.get("state"), item.get("stop_requested_at")
    if work_id is None:
        return "id: not a valid id"
    if not isinstance(state, str):
        return "state: Input should be a valid string"
    if not isinstance(stop_requested_at, str | None):
        return "stop_requested_at: Input should be a valid string"
    return ListedWork(work_id, state, stop_requested_at)


def _stopped_work(endpoint: str, response: httpx.Response) -> Work | None:
    """Stop: as `_optional_work`, but a 2xx means the stop was applied, so an echoed item that
    fails validation is no reason to report a failure (or to stop again): it is None."""
    try:
        return _optional_work(endpoint, response)
    except InvalidWorkItem:
        return None


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One endpoint's request and the parser of its answer: everything except sending it."""

    endpoint: str
    request: httpx.Request
    parse: Parser[T]

    def result(self, response: httpx.Response) -> T:
        if not response.is_success:
            raise error_from_response(self.endpoint, response)
        return self.parse(self.endpoint, response)


class HeartbeatRequests:
    """The heartbeat as bytes, for a client that sends thousands a second: what stays the same
    from one heartbeat to the next (the origin, the path up to the work id, every header) is
    taken once from a request built as every other (`WorkAPI.heartbeat`), and each heartbeat
    adds only its path and query. An answer is judged as `Call.result` judges it; only a
    readable 2xx skips building an `httpx.Response`. Building and parsing httpx's URL, request
    and response objects cost more CPU a heartbeat than sending it."""

    ENDPOINT = "heartbeat"
    TEMPLATE_ID = "work_template"
    _EXPECTED = "a heartbeat"

    def __init__(self, template: Call[Heartbeat], *, default_timeout: float) -> None:
        url = template.request.url
        self.template = template
        self.origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        # The template has no query: its path ends ".../work/{TEMPLATE_ID}/heartbeat".
        self.prefix = url.raw_path[:url.raw_path.rindex(f"/{self.TEMPLATE_ID}/".encode()) + 1]
        self.headers = list(template.request.headers.raw)
        self._default_timeout = default_timeout
        self._timeouts: dict[float | None, dict[str, float | None]] = {}

    def target(self, work_id: str, *, expected_last_heartbeat: str | None,
               desired_ttl_seconds: int | None) -> bytes:
        """The request target (path and query) as `WorkAPI.heartbeat` would build it."""
        query = [f"expected_last_heartbeat={quote(expected_last_heartbeat, safe='')}"
                 if expected_last_heartbeat is not None else "",
                 f"desired_ttl_seconds={desired_ttl_seconds}"
                 if desired_ttl_seconds is not None else ""]
        joined = "&".join(part for part in query if part)
        path = f"{_id(work_id, 'work_id')}/heartbeat{'?' if joined else ''}{joined}"
        return self.prefix + path.encode("ascii")

    def timeouts(self, timeout: float | None) -> dict[str, float | None]:
        found = self._timeouts.get(timeout)
        if found is None:
            found = self._timeouts[timeout] = httpx.Timeout(
                timeout or self._default_timeout).as_dict()
        return found

    def result(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
               body: bytes) -> Heartbeat:
        if 200 <= status < 300 and body:
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):
                pass  # judged below, with the message every endpoint gives
            else:
                return _validate(self.ENDPOINT, status, Heartbeat, self._EXPECTED, data)
        response = httpx.Response(status, headers=headers, content=body,
                                  request=self.template.request,
                                  extensions={"reason_phrase": reason})
        return self.template.result(response)


# --- requests --------------------------------------------------------------------------------
def _id(value: str, what: str) -> str:
    # Checked, not only quoted: `..` quotes to itself and walks the path up a level.
    return quote(check_id(value, what), safe="")


class WorkAPI:
    """The sans-IO core: a `Call` per endpoint, and the retry decision."""

    def __init__(
        self,
        *,
        base_url: str,
        environment_id: str,
        environment_key: str | None,
        api_key: str | None,
        worker_id: str | None,
        timeout: float,
        max_retries: int,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.environment_id = environment_id
        self.worker_id = worker_id
        self.timeout = timeout
        self.max_retries = max_retries
        self._root = f"{self.base_url}/v1/environments/{_id(environment_id, 'environment_id')}/work"
        self._environment_key = environment_key
        self._api_key = api_key

    def describe(self) -> str:
        """The settings worth showing; never the keys."""
        return (f"base_url={self.base_url!r}, environment_id={self.environment_id!r}, "
                f"worker_id={self.worker_id!r}")

    def _credential(self, endpoint: str, auth: Auth) -> dict[str, str]:
        if auth is Auth.ENVIRONMENT or (auth is Auth.EITHER and self._environment_key):
            if not self._environment_key:
                raise MissingCredentialError(
                    f"ANTHROPIC_ENVIRONMENT_KEY is not set: {endpoint} needs the environment key")
            return {"authorization": f"Bearer {self._environment_key}"}
        if self._api_key:
            return {"authorization": f"Bearer {self._api_key}"}
        if auth is Auth.ORGANISATION:
            raise MissingCredentialError(
                f"ANTHROPIC_API_KEY is not set: {endpoint} needs the organisation key")
        raise MissingCredentialError(
            f"neither ANTHROPIC_ENVIRONMENT_KEY nor ANTHROPIC_API_KEY is set: {endpoint} needs one")

    def _call(
        self,
        endpoint: str,
        method: str,
        suffix: str,
        auth: Auth,
        parse: Parser[T],
        *,
        params: Mapping[str, str | int | None] | None = None,
        body: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        bearer: str | None = None,
    ) -> Call[T]:
        # No `?beta=true`: SDK 2.10.0 keeps it as a request qualifier and never sends it.
        query = {k: v for k, v in (params or {}).items() if v is not None}
        request = httpx.Request(
            method,
            self._root + suffix,
            params=query,
            headers={
                # `bearer`: a credential of the call's own (a delivery's sessions token).
                **({"authorization": f"Bearer {bearer}"} if bearer
                   else self._credential(endpoint, auth)),
                "anthropic-version": ANTHROPIC_VERSION,
                "anthropic-beta": BETA,
                "user-agent": USER_AGENT,
                "accept": "application/json",
                # The SDK declares JSON on every POST, an empty ack or heartbeat included.
                **({"content-type": "application/json"} if method == "POST" else {}),
                **(headers or {}),
            },
            json=body,
            extensions={"timeout": httpx.Timeout(timeout or self.timeout).as_dict()},
        )
        return Call(endpoint, request, parse)

    def poll(
        self, *, block_ms: int | None, reclaim_older_than_ms: int | None
    ) -> Call[Work | None]:
        if block_ms is not None and not 1 <= block_ms <= POLL_BLOCK_MS_MAX:
            raise ValueError(f"block_ms must be 1..{POLL_BLOCK_MS_MAX}, or None for a "
                             f"non-blocking poll; got {block_ms}")
        if reclaim_older_than_ms is not None and reclaim_older_than_ms < 1:
            raise ValueError(
                f"reclaim_older_than_ms must be at least 1; got {reclaim_older_than_ms}")
        return self._call(
            "poll", "GET", "/poll", Auth.ENVIRONMENT, _optional_work,
            params={"block_ms": block_ms, "reclaim_older_than_ms": reclaim_older_than_ms},
            headers={"anthropic-worker-id": self.worker_id} if self.worker_id else None,
            # The server holds the request open for block_ms before it answers.
            timeout=self.timeout + (block_ms or 0) / 1000,
        )

    def ack(self, work_id: str) -> Call[Work]:
        return self._call("ack", "POST", f"/{_id(work_id, 'work_id')}/ack", Auth.ENVIRONMENT,
                          _model(Work, "a work item"))

    def heartbeat(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str | None,
        desired_ttl_seconds: int | None,
        timeout: float | None,
    ) -> Call[Heartbeat]:
        return self._call(
            "heartbeat", "POST", f"/{_id(work_id, 'work_id')}/heartbeat", Auth.ENVIRONMENT,
            _model(Heartbeat, "a heartbeat"),
            params={"expected_last_heartbeat": expected_last_heartbeat,
                    "desired_ttl_seconds": desired_ttl_seconds},
            timeout=timeout,
        )

    def heartbeat_requests(self) -> HeartbeatRequests:
        """The heartbeat, prepared once for sending as bytes (`HeartbeatRequests`)."""
        template = self.heartbeat(HeartbeatRequests.TEMPLATE_ID, expected_last_heartbeat=None,
                                  desired_ttl_seconds=None, timeout=None)
        return HeartbeatRequests(template, default_timeout=self.timeout)

    def stop(self, work_id: str, *, force: bool,
             sessions_token: str | None = None) -> Call[Work | None]:
        """`sessions_token`: sent as a delivery's own sessions token instead of the key, as SDK
        2.17's poller stops an item it may no longer hold."""
        return self._call("stop", "POST", f"/{_id(work_id, 'work_id')}/stop", Auth.EITHER,
                          _stopped_work, body={"force": force}, bearer=sessions_token)

    def get(self, work_id: str) -> Call[Work]:
        return self._call("get", "GET", f"/{_id(work_id, 'work_id')}", Auth.ORGANISATION,
                          _model(Work, "a work item"))

    def update(self, work_id: str, metadata: Mapping[str, str | None]) -> Call[Work]:
        return self._call("update", "POST", f"/{_id(work_id, 'work_id')}", Auth.ORGANISATION,
                          _model(Work, "a work item"),
                          body={"metadata": dump_metadata(dict(metadata))})

    def list(self, *, limit: int | None, page: str | None) -> Call[WorkPage]:
        return self._call("list", "GET", "", Auth.ENVIRONMENT,
                          _page,
                          params={"limit": limit, "page": page})

    def list_states(self, *, limit: int | None, page: str | None) -> Call[ListedPage]:
        """`list`, each item read for its id, state and stop request only (the stop bridge's
        sweep: a fraction of the CPU of whole items)."""
        return self._call("list", "GET", "", Auth.ENVIRONMENT, _listed_page,
                          params={"limit": limit, "page": page})

    def stats(self) -> Call[WorkQueueStats]:
        return self._call("stats", "GET", "/stats", Auth.EITHER,
                          _model(WorkQueueStats, "queue stats"))

    def retry_delay(self, exc: WorkAPIError, failures: int, backoff: Backoff) -> float | None:
        """Seconds to wait before the next try after ``failures`` failed ones; None: give up."""
        if not exc.retryable or failures > self.max_retries:
            return None
        delay = delay_for(exc, backoff)
        if delay > WAIT_IN_CALL_SECONDS:
            return None  # the caller paces the environment (control/pacing)
        fields = {"endpoint": exc.endpoint, "status": exc.status, "attempt": failures,
                  "max_retries": self.max_retries, "delay_seconds": round(delay, 3)}
        logger.warning(
            "retry %s", " ".join(f"{k}={v}" for k, v in fields.items()),
            extra={"action": "retry", "error_type": exc.error_type, **fields},
        )
        return delay
