"""HTTP exchanges with the SAM2 service: deadlines, progress, retries, size caps, errors that say what to do.

`ServiceHttp` owns the connection: SAM_API_URL checked once, credentials turned into one Authorization
header sent to the service's own origin only, a pooled httpx client, retries on 429/5xx and failures to
connect (never after a read timeout: the service may be running, and billing for, the first request).
`run_call` runs one call's HTTP on a worker thread while the caller's thread reports progress and can
give up (a cancel event or the deadline). What a request carries is the protocol's job (service_protocols).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpx

from errors import (
    InvalidInput,
    SegmentationAuthError,
    SegmentationBadResponse,
    SegmentationBusy,
    SegmentationCancelled,
    SegmentationEndpointNotFound,
    SegmentationError,
    SegmentationImageTooLarge,
    SegmentationMaskURLError,
    SegmentationRejected,
    SegmentationServerError,
    SegmentationTimeout,
    SegmentationUnavailable,
    SegmentationUnreachable,
)
from segmenter import Progress
from service_protocols import ServiceProtocol
from settings import Settings, host_port
from url_safety import Redactor, checked_url, quiet_http_logs, safe_url

log = logging.getLogger("mask_studio.sam2")

CONNECT_TIMEOUT = 10.0
HEALTH_TIMEOUT = 3.0
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
MAX_MASK_BYTES = 16 * 1024 * 1024
TICK = 0.05  # how often the caller's thread looks at cancel / deadline
PROGRESS_EVERY = 0.5
GRACE = 1.0  # the worker's own timeouts fire first and say more; this is the backstop
# An idle connection is kept this long (httpx's default is 5 s): people click seconds apart, and each click
# should not open a connection (and, through a proxy, a TLS session). sam2_service keeps its side open longer.
KEEPALIVE = 60.0

T = TypeVar("T")


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: bytes
    url: str
    retries: int = 0
    retry_after_refused: float | None = None  # Retry-After asked for more time than SAM_API_TIMEOUT leaves


@dataclass
class Call:
    """State shared by the caller's thread (progress, cancel, deadline) and the worker doing the HTTP."""

    deadline: float
    budget: float
    service: str
    stop: threading.Event = field(default_factory=threading.Event)
    fraction: float = 0.0
    text: str = "Preparing the image"
    waiting_since: float | None = None
    started: float = field(default_factory=time.monotonic)
    # replicate: "creating" while the POST that creates the prediction is out, "running" once it can be cancelled
    prediction: str | None = None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def report(self, fraction: float, text: str, *, waiting: bool = False) -> None:
        """Set the phase; while waiting, progress creeps on from the moment the waiting began."""
        if waiting and self.waiting_since is not None:
            self.text = text
            return
        self.fraction, self.text = fraction, text
        self.waiting_since = time.monotonic() if waiting else None

    def progress_now(self) -> tuple[float, str]:
        now = time.monotonic()
        if self.waiting_since is None:
            return self.fraction, self.text
        # Creep towards 0.8 while waiting: the service gives no percentage.
        crept = self.fraction + (0.8 - self.fraction) * (1 - math.exp(-(now - self.waiting_since) / 20))
        return crept, f"{self.text} ({now - self.started:.0f} s)"

    def timeout_error(self) -> SegmentationTimeout:
        return SegmentationTimeout(
            f"The {self.service} did not finish within {self.budget:g} s (SAM_API_TIMEOUT). "
            "Try again, use a smaller image (SAM_MAX_SIDE) or raise SAM_API_TIMEOUT."
        )

    def check(self, *, cancel: bool = True) -> None:
        """Raise if the caller gave up (unless cancel=False) or the time is over; called between steps."""
        if cancel and self.stop.is_set():
            raise SegmentationCancelled("Segmentation cancelled.")
        if self.remaining() <= 0:
            raise self.timeout_error()

    def cancelled_message(self) -> str:
        """What the person is told when they cancel: no claim about the prediction beyond what is under way."""
        if self.prediction == "creating":
            return (
                "Segmentation cancelled. The prediction was still being created: Mask Studio will ask the service "
                "to cancel it as soon as the service answers."
            )
        if self.prediction == "running":
            return "Segmentation cancelled; Mask Studio is asking the service to cancel the prediction."
        return "Segmentation cancelled."


def run_call(
    job: Callable[[Call], T], service: str, timeout: float, progress: Progress | None, cancel: threading.Event | None
) -> T:
    """job(call) on a worker thread doing the HTTP; this thread reports progress and gives up on cancel or time."""
    if cancel is not None and cancel.is_set():
        raise SegmentationCancelled("Segmentation cancelled before it started.")
    call = Call(deadline=time.monotonic() + timeout, budget=timeout, service=service)
    done = threading.Event()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = job(call)
        except RecursionError as exc:  # whatever in the answer was nested too deeply to read
            error = SegmentationBadResponse(f"The {service} answered data nested too deeply to read.")
            error.__cause__ = exc
            box["error"] = error
        except Exception as exc:  # handed to the caller's thread below
            box["error"] = exc
            if call.stop.is_set():
                log.debug("abandoned SAM2 call ended with %s", type(exc).__name__)
        finally:
            done.set()

    threading.Thread(target=work, name="sam2-call", daemon=True).start()
    last, shown = 0.0, 0.0
    try:
        if progress is not None:
            progress(0.0, f"Sending the image to the {service}")
        while not done.wait(TICK):
            if cancel is not None and cancel.is_set():
                raise SegmentationCancelled(call.cancelled_message())
            if call.remaining() < -GRACE:
                raise call.timeout_error()
            now = time.monotonic()
            if progress is not None and now - last >= PROGRESS_EVERY:
                fraction, text = call.progress_now()
                last, shown = now, max(shown, fraction)  # never backwards, whatever the phase says
                progress(shown, text)
    finally:
        if not done.is_set():
            call.stop.set()  # the worker stops at its next step (and cancels a replicate prediction)
    if "error" in box:
        raise box["error"]
    if progress is not None:
        progress(1.0, f"Received the answer of the {service}")
    return box["value"]


class ServiceHttp:
    """The connection to one SAM2 service: its address, credentials, allowed hosts, timeouts and retries."""

    max_mask_bytes = MAX_MASK_BYTES
    max_response_bytes = MAX_RESPONSE_BYTES

    def __init__(
        self,
        settings: Settings,
        protocol: ServiceProtocol,
        *,
        transport: httpx.BaseTransport | None = None,
        backoff: float = 1.0,
    ):
        url = settings.sam_api_url
        if not url:
            raise InvalidInput("SAM_API_URL is not set.", title="Configuration error")
        try:
            _, parts = checked_url(url.rstrip("/"), "")
        except ValueError as exc:
            raise InvalidInput(
                f"SAM_API_URL {safe_url(url)!r} is not a valid URL ({exc}).", title="Configuration error"
            ) from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(
                f"SAM_API_URL must be an http:// or https:// address; got {safe_url(url)!r}.",
                title="Configuration error",
            )
        quiet_http_logs()
        self.settings = settings
        self.protocol = protocol
        self._auth, self.redact = _credentials(settings.sam_api_token, parts)
        self._parts = (parts.scheme, host_port(parts.hostname, parts.port), parts.path.rstrip("/"), parts.query)
        self.base = self.endpoint("")
        self._origin = (parts.scheme, parts.hostname.lower(), parts.port)
        hosts = [h.lower().lstrip("*").lstrip(".") for h in settings.sam_mask_url_hosts] + list(protocol.file_hosts)
        self._mask_hosts = tuple(h for h in hosts if h)
        self.timeout = float(settings.sam_api_timeout)
        self._connect_timeout = min(CONNECT_TIMEOUT, self.timeout)
        self._retries = max(0, int(settings.sam_api_retries))
        self.backoff = backoff
        self.engine = f"SAM2 service at {safe_url(self.base)}"
        self._client = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(self.timeout, connect=self._connect_timeout),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4, keepalive_expiry=KEEPALIVE),
            headers={"User-Agent": "mask-studio"},
        )

    @property
    def host(self) -> str:
        """The service's own host name (lower case), for messages about other hosts."""
        return self._origin[1]

    def endpoint(self, suffix: str) -> str:
        """SAM_API_URL with `suffix` added to its path (a query string, if any, stays at the end)."""
        scheme, netloc, path, query = self._parts
        return urlunsplit((scheme, netloc, path + suffix, query, ""))

    def health(self) -> tuple[bool, str]:
        """GET {url}/health, falling back to GET {url}; (ok, sentence) within about 3 s, never raises."""
        start = time.monotonic()
        reply = None
        try:
            for url in (self.endpoint("/health"), self.base):
                left = HEALTH_TIMEOUT - (time.monotonic() - start)
                if left <= 0.05:
                    break
                reply = self._client.get(url, headers=self._auth, timeout=httpx.Timeout(left))
                reply.close()
                if reply.status_code not in (404, 405):
                    break
        except httpx.TimeoutException:
            return False, f"The {self.engine} did not answer within {HEALTH_TIMEOUT:g} s."
        except httpx.ConnectError as exc:
            return False, f"The {self.engine} cannot be reached: {self._connect_reason(exc, self.base)}."
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: the client is closed
            return False, f"The {self.engine} cannot be reached ({type(exc).__name__})."
        if reply is None:
            return False, f"The {self.engine} did not answer within {HEALTH_TIMEOUT:g} s."
        status = reply.status_code
        if status in (401, 403):
            return False, f"The {self.engine} rejects the token (HTTP {status}): check SAM_API_TOKEN."
        if status >= 500:
            return False, f"The {self.engine} answers with an error (HTTP {status})."
        how = "health check OK" if reply.url.path.endswith("/health") and status < 300 else f"HTTP {status}"
        return True, f"The {self.engine} answers ({how})."

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def cancel_prediction(self, url: str) -> None:
        """Best effort: a prediction we no longer wait for should stop costing money."""
        try:
            reply = self._client.post(url, headers=self.headers_for(url), timeout=HEALTH_TIMEOUT)
        except (httpx.HTTPError, httpx.InvalidURL, RuntimeError, ValueError) as exc:
            name = type(exc).__name__
            log.warning("Could not cancel the SAM2 prediction at %s (%s).", safe_url(url), name)
            return
        if 200 <= reply.status_code < 300:
            log.info("Cancelled the SAM2 prediction at %s (HTTP %d).", safe_url(url), reply.status_code)
        else:
            log.warning("Could not cancel the SAM2 prediction at %s (HTTP %d).", safe_url(url), reply.status_code)

    # -- HTTP with retries -----------------------------------------------------------------------------

    def send(
        self,
        call: Call,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        mask: bool = False,
        creating: bool = False,
    ) -> Reply:
        """One exchange, repeated only on 429/5xx and failures to connect (never after a read timeout).

        creating: the POST that creates a paid prediction. Once sent, its answer is read to the end even if
        the caller cancels meanwhile: it carries the urls.cancel that stops the prediction."""
        what = f"mask URL {safe_url(url)}" if mask else self.engine
        attempt = 0
        while True:
            call.check()
            left = call.remaining()
            timeout = httpx.Timeout(left, connect=min(self._connect_timeout, left))
            failure: SegmentationError | None = None
            cause: Exception | None = None
            reply: Reply | None = None
            if creating:
                call.prediction = "creating"
            try:
                reply = self._exchange(call, method, url, content, headers, timeout, mask, finish=creating)
            except httpx.ConnectTimeout as exc:
                failure, cause = (
                    SegmentationTimeout(f"Could not connect to the {what} within {self._connect_timeout:g} s."),
                    exc,
                )
            except httpx.ConnectError as exc:
                failure, cause = (
                    SegmentationUnreachable(f"The {what} cannot be reached: {self._connect_reason(exc, url)}."),
                    exc,
                )
            except httpx.TimeoutException as exc:
                # The service may be working on it (and billing for it): report, do not send it again.
                if call.stop.is_set():
                    call.check()
                raise SegmentationTimeout(
                    f"The {what} did not answer within {self.timeout:g} s (SAM_API_TIMEOUT). "
                    "Try again, use a smaller image (SAM_MAX_SIDE) or raise SAM_API_TIMEOUT."
                ) from exc
            except httpx.RemoteProtocolError as exc:
                if "location header" not in str(exc).lower():
                    raise SegmentationUnavailable(
                        f"The connection to the {what} broke before a complete answer ({type(exc).__name__}); "
                        "it was not sent again, as the service may have run it."
                    ) from exc
                raise SegmentationBadResponse(  # httpx reads a redirect's Location even when not following it
                    f"The {what} answered a redirect to an invalid address; redirects are not followed: "
                    "set SAM_API_URL to the final address."
                ) from exc
            except httpx.HTTPError as exc:
                raise SegmentationUnavailable(
                    f"The connection to the {what} broke before a complete answer ({type(exc).__name__}); "
                    "it was not sent again, as the service may have run it."
                ) from exc
            retry_after = None
            if creating and (reply is None or not 200 <= reply.status < 300):
                call.prediction = None  # no prediction was created
            if reply is not None:
                if reply.status != 429 and reply.status < 500:
                    return reply
                retry_after = _retry_after(reply.headers.get("Retry-After"))
            wait = retry_after if retry_after is not None else self.backoff * 2**attempt
            out_of_retries = attempt >= self._retries
            if out_of_retries or wait >= call.remaining():
                # Give up: raise the failure, or hand the 429/5xx answer to check_answer to explain.
                if failure is not None:
                    raise failure from cause
                assert reply is not None  # no failure: the service answered 429/5xx
                reply.retries = attempt
                if not out_of_retries:
                    reply.retry_after_refused = retry_after
                return reply
            why = f"HTTP {reply.status}" if reply is not None else type(cause).__name__
            how = "Retry-After" if retry_after is not None else "backoff"
            log.warning(
                "%s: %s; retrying in %.1f s (%s), retry %d of %d",
                what,
                why,
                wait,
                how,
                attempt + 1,
                self._retries,
            )
            call.stop.wait(wait)  # a cancel wakes it early; the check at the top of the loop raises
            attempt += 1

    def _exchange(self, call, method, url, content, headers, timeout, mask, finish=False) -> Reply:
        """Stream one response, capping its size and watching the deadline (and, unless finish, a cancel)."""
        cap = self.max_mask_bytes if mask else self.max_response_bytes
        with self._client.stream(method, url, content=content, headers=headers, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > cap:
                self._too_big(url, int(declared), cap, mask)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > cap:
                    self._too_big(url, size, cap, mask)
                chunks.append(chunk)
                call.check(cancel=not finish)  # a service trickling bytes must not outlast SAM_API_TIMEOUT
            return Reply(response.status_code, response.headers, b"".join(chunks), str(response.url))

    def _too_big(self, url: str, size: int, cap: int, mask: bool) -> None:
        if mask:
            raise SegmentationMaskURLError(
                f"The mask at {safe_url(url)} is larger than {cap // 1024} KB ({size // 1024} KB or more)."
            )
        raise SegmentationBadResponse(f"The {self.engine}'s answer is larger than {cap // 1024 // 1024} MB.")

    def check_answer(self, reply: Reply, method: str, url: str, frame=None, sent_bytes=0) -> None:
        """Turn a non-2xx answer from the service into the exception that says what to do."""
        status = reply.status
        if 200 <= status < 300:
            return
        detail = self._detail(reply)
        where = f"{method} {safe_url(url)}"
        if 300 <= status < 400:
            location = reply.headers.get("Location", "")
            try:
                location = urljoin(url, location)
            except ValueError:
                pass  # not a valid URL: shown as it came, without what may hold a secret
            location = self.redact(safe_url(location))
            raise SegmentationBadResponse(
                f"The {self.engine} redirected {where} to {location} (HTTP {status}); redirects are not "
                "followed: set SAM_API_URL to the final address."
            )
        if status in (401, 403):
            fix = "check SAM_API_TOKEN" if self._auth else "it needs a token: set SAM_API_TOKEN"
            raise SegmentationAuthError(
                f"The {self.engine} refused the token (HTTP {status}{detail}): {fix}.", title="Token rejected"
            )
        if status == 404:
            raise SegmentationEndpointNotFound(
                f"The {self.engine} answered 404 Not Found for {where}: check SAM_API_URL, "
                f"SAM_API_SEGMENT_PATH and SAM_API_PROTOCOL ({self.protocol.name}).",
                title="Segmentation service not found",
            )
        if status == 413:
            size = f"{sent_bytes / 1024 / 1024:.1f} MB, {frame.sent[1]}×{frame.sent[0]} px" if frame else "?"
            raise SegmentationImageTooLarge(
                f"The {self.engine} refused the image as too large (HTTP 413; {size} sent). "
                f"Lower SAM_MAX_SIDE (now {self.settings.sam_max_side}).",
                title="Image too large for the segmentation service",
            )
        after = f" after {reply.retries} retr{'y' if reply.retries == 1 else 'ies'}" if reply.retries else ""
        if reply.retry_after_refused is not None:
            after += f"; it asked to wait {reply.retry_after_refused:g} s, beyond SAM_API_TIMEOUT"
        if status == 429:
            raise SegmentationBusy(
                f"The {self.engine} is rate-limiting requests (HTTP 429{detail}){after}. Try again later."
            )
        if status >= 500:
            raise SegmentationServerError(f"The {self.engine} failed with HTTP {status}{detail}{after}.")
        raise SegmentationRejected(f"The {self.engine} refused the request (HTTP {status}{detail}).")

    def read_json(self, reply: Reply) -> Any:
        try:
            return json.loads(reply.body)
        except RecursionError as exc:
            raise SegmentationBadResponse(f"The {self.engine} answered JSON nested too deeply to read.") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            kind = reply.headers.get("Content-Type", "no content type")
            start = self.redact(reply.body[:60].decode("utf-8", "replace"))
            raise SegmentationBadResponse(
                f"The {self.engine} did not answer JSON (HTTP {reply.status}, {kind}, starting {start!r}). "
                "Is SAM_API_URL the address of a SAM2 service?"
            ) from exc

    def _detail(self, reply: Reply) -> str:
        """': <the service's own explanation>' (redacted and short), or ''."""
        text = ""
        try:
            data = json.loads(reply.body)
            if isinstance(data, dict):
                text = str(data.get("detail") or data.get("error") or data.get("message") or "")
        except (ValueError, UnicodeDecodeError, RecursionError):
            text = reply.body[:200].decode("utf-8", "replace") if b"<" not in reply.body[:1] else ""
        text = " ".join(self.redact(text).split())[:200]
        return f": {text}" if text else ""

    def host_allowed(self, host: str) -> bool:
        """The service's own host, or a host listed in SAM_MASK_URL_HOSTS (subdomains included)."""
        host = host.lower()
        return bool(host) and (
            host == self._origin[1] or any(host == h or host.endswith("." + h) for h in self._mask_hosts)
        )

    def headers_for(self, url: str) -> dict[str, str]:
        """The token goes to the service's own origin only, never to a file host."""
        parts = urlsplit(url)
        same = (parts.scheme, (parts.hostname or "").lower(), parts.port) == self._origin
        return dict(self._auth) if same else {}

    def _connect_reason(self, exc: Exception, url: str) -> str:
        text = str(exc)
        parts = urlsplit(url)
        if any(
            s in text
            for s in (
                "Name or service not known",
                "nodename nor servname",
                "getaddrinfo",
                "Temporary failure in name resolution",
                "No address associated",
            )
        ):
            return f"the host name {parts.hostname!r} could not be resolved (DNS)"
        if "refused" in text.lower() or "Errno 111" in text:
            return f"connection refused (nothing listens at {parts.hostname}:{parts.port or parts.scheme})"
        return self.redact(text) or type(exc).__name__

    # -- reading the answer ------------------------------------------------------------------------------


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        if value.isascii() and value.replace(".", "", 1).isdigit():
            return float(value)
        when = parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _credentials(token: str | None, parts) -> tuple[dict[str, str], Redactor]:
    """The Authorization header (SAM_API_TOKEN, else user:password from the URL) and what hides the secrets."""
    auth: dict[str, str] = {}
    secrets = [token or ""]
    if parts.password:  # shown nowhere, raw or as the URL spells it (percent-encoded)
        secrets += [parts.password, unquote(parts.password)]
    if token:
        auth["Authorization"] = f"Bearer {token}"
    elif parts.username is not None:
        # Credentials in the URL become a header, so the URL itself (logged by httpx) carries none.
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        basic = base64.b64encode(pair).decode("ascii")  # redacted like a token
        auth["Authorization"] = f"Basic {basic}"
        secrets.append(basic)
    return auth, Redactor(secrets)
