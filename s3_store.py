"""Mask PNGs (and other blobs) in an S3 bucket or any S3-compatible store, through boto3.

`make_s3_client` is the one place a boto3 client is built; `S3BlobStore` implements storage.BlobStore
plus what the app needs around S3: URLs (public or presigned), unique mask keys, batched deletes, a
start-up check that never raises, and `upload_many`, a bounded concurrent upload that reports each item
as uploaded or failed, never raises for a per-item failure, and stops early once S3 is plainly down or
hung. botocore errors are translated here, once, into StorageError with a sentence a person can act on;
no message or log line carries credentials.
"""

from __future__ import annotations

import datetime as _dt
import logging
import mimetypes
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from errors import InvalidInput, NotFound, StorageError
from storage import check_key

if TYPE_CHECKING:
    import boto3

    from settings import Settings

log = logging.getLogger(__name__)

UPLOAD_WORKERS = 8
DELETE_BATCH = 1000  # DeleteObjects' limit per request
SMALL_BODY = 1024 * 1024  # below this, waiting for "100 Continue" costs more than resending would
URL_MODES = ("public", "presigned")
# Per request: a few seconds to connect, ~10 s for an answer, one retry. A mask PNG is tens of KB, so a
# slower answer means a hung endpoint, and upload_many stops after STOP_AFTER_HANGS of those in a row.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 2
STOP_AFTER_HANGS = 2


class S3Unavailable(StorageError):
    """The bucket cannot be used at all right now (credentials, permission, bucket, endpoint): retry later."""


class S3Unresponsive(StorageError):
    """The endpoint took the request but did not answer in time, or the connection broke: maybe hung."""


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


def make_s3_client(
    settings: Settings,
    session: boto3.session.Session | None = None,
    *,
    max_pool_connections: int = UPLOAD_WORKERS,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    read_timeout: float = READ_TIMEOUT_S,
    max_attempts: int = MAX_ATTEMPTS,
) -> Any:
    """The one boto3 S3 client factory: honours S3_ENDPOINT_URL and AWS_REGION; credentials from boto3's chain."""
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {}
    if settings.s3_endpoint_url:
        # MinIO and most S3-compatible stores want path-style URLs and reject the optional
        # checksums that recent botocore versions add to every request.
        options.update(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        signature_version="s3v4",
        **options,
    )
    try:
        session = session or boto3.session.Session()
        client = session.client(
            "s3", region_name=settings.aws_region, endpoint_url=settings.s3_endpoint_url, config=config
        )
    except _boto_errors() as exc:
        raise translate_error(exc, bucket=settings.s3_bucket or "", action="set up the S3 client") from exc
    except ValueError as exc:  # botocore's "Invalid endpoint"
        raise S3Unavailable(f"S3_ENDPOINT_URL {settings.s3_endpoint_url!r} is not a valid URL.") from exc
    # botocore adds the header on "before-call.s3"; registering last there runs after it.
    client.meta.events.register_last("before-call.s3", _no_expect_for_small_bodies)
    return client


def _no_expect_for_small_bodies(model: Any, params: dict, **_: Any) -> None:
    """Drop botocore's `Expect: 100-continue` on small bodies: it costs a round trip per mask for nothing."""
    from botocore.utils import determine_content_length

    if model.name != "PutObject" or "Expect" not in params.get("headers", {}):
        return
    size = determine_content_length(params.get("body"))
    if size is not None and size < SMALL_BODY:
        del params["headers"]["Expect"]


# --------------------------------------------------------------------------------------------
# Error translation
# --------------------------------------------------------------------------------------------

_BUCKET_MISSING = (
    "The S3 bucket '{bucket}' does not exist (check S3_BUCKET_NAME_STAGING, AWS_REGION and S3_ENDPOINT_URL)."
)
_OTHER_REGION = "The S3 bucket '{bucket}' is in another region: set AWS_REGION to the bucket's region."
_CLIENT_ERRORS: dict[str, tuple[bool, str]] = {
    # code: (bucket-wide?, message). Server messages are not repeated: some (SignatureDoesNotMatch)
    # echo the string to sign and the access key id.
    "NoSuchBucket": (True, _BUCKET_MISSING),
    "AccessDenied": (
        True,
        "S3 denied access to bucket '{bucket}' (trying to {action}): the credentials in use lack that permission.",
    ),
    "AllAccessDisabled": (True, "All access to the S3 bucket '{bucket}' is disabled."),
    "InvalidAccessKeyId": (
        True,
        "S3 does not recognise the AWS access key id in use (check AWS_ACCESS_KEY_ID or AWS_PROFILE).",
    ),
    "SignatureDoesNotMatch": (
        True,
        "S3 rejected the request signature: the AWS secret access key does not match "
        "the access key id (check AWS_SECRET_ACCESS_KEY).",
    ),
    "ExpiredToken": (True, "The AWS session token has expired: refresh the credentials."),
    "InvalidToken": (True, "The AWS session token is invalid: refresh the credentials."),
    "AuthorizationHeaderMalformed": (True, "S3 rejected the request's region: check AWS_REGION for bucket '{bucket}'."),
    "PermanentRedirect": (True, _OTHER_REGION),
    "AccessControlListNotSupported": (True, "The S3 bucket '{bucket}' has ACLs disabled: unset S3_OBJECT_ACL."),
    "SlowDown": (False, "S3 asked to slow down (trying to {action}): try again shortly."),
    "InternalError": (False, "S3 had an internal error (trying to {action}): try again shortly."),
    "ServiceUnavailable": (False, "S3 is unavailable right now (trying to {action}): try again shortly."),
    # HEAD answers carry no body, so only the HTTP status is known.
    "404": (True, _BUCKET_MISSING),
    "403": (
        True,
        "S3 refused access to bucket '{bucket}' (trying to {action}): the credentials are invalid or lack permission.",
    ),
    "301": (True, _OTHER_REGION),
    "400": (
        True,
        "S3 rejected the request for bucket '{bucket}' (HTTP 400, trying to {action}): check AWS_REGION "
        "and the credentials.",
    ),
}


def translate_error(
    exc: Exception, *, bucket: str, action: str, key: str = "", endpoint: str | None = None
) -> StorageError | NotFound:
    """A botocore/boto3 error → StorageError (S3Unavailable: bucket unusable), or NotFound for a missing key."""
    from botocore import exceptions as bex

    where = f"the S3 endpoint {endpoint}" if endpoint else "S3"
    where_ = where[0].upper() + where[1:]
    if isinstance(exc, bex.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "")) or str(
            exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "unknown")
        )
        if code == "NoSuchKey" or (code == "404" and key):
            return NotFound(f"The object '{key}' is not in the S3 bucket '{bucket}'.")
        bucket_wide, template = _CLIENT_ERRORS.get(
            code, (False, "S3 refused the request for bucket '{bucket}' (trying to {action}; error code " + code + ").")
        )
        cls = S3Unavailable if bucket_wide else StorageError
        return cls(template.format(bucket=bucket, action=action, key=key))
    if isinstance(exc, bex.NoCredentialsError):
        return S3Unavailable(
            "No AWS credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE, or run with an instance or task role."
        )
    if isinstance(exc, bex.PartialCredentialsError):
        return S3Unavailable(
            "The AWS credentials are incomplete: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must both be set."
        )
    if isinstance(exc, (bex.ProfileNotFound, bex.CredentialRetrievalError)):
        return S3Unavailable(f"The AWS credentials could not be loaded ({type(exc).__name__}): check AWS_PROFILE.")
    if isinstance(exc, bex.ConnectTimeoutError):
        return S3Unavailable(f"{where_} did not accept a connection in time (trying to {action}): is it reachable?")
    if isinstance(exc, bex.ReadTimeoutError):
        return S3Unresponsive(f"{where_} did not answer in time while trying to {action}.")
    if isinstance(exc, bex.EndpointConnectionError):
        return S3Unavailable(f"Could not connect to {where} to {action}: is it running and reachable?")
    if isinstance(exc, (bex.ConnectionClosedError, bex.ResponseStreamingError, bex.HTTPClientError)):
        return S3Unresponsive(f"The connection to {where} broke while trying to {action}.")
    if isinstance(exc, bex.NoRegionError):
        return S3Unavailable("No AWS region is set: set AWS_REGION.")
    if isinstance(exc, bex.InvalidRegionError):
        return S3Unavailable("AWS_REGION is not a valid region name (like eu-west-1).")
    return StorageError(f"S3 request to {action} failed ({type(exc).__name__}).")


def _boto_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


# --------------------------------------------------------------------------------------------
# Upload report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadReport:
    """What happened to each item of an upload_many batch."""

    uploaded: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)  # key → reason
    stopped: str = ""  # why the batch stopped early (S3 unusable or hung), or "" if every item was tried

    @property
    def n_uploaded(self) -> int:
        return len(self.uploaded)

    @property
    def n_failed(self) -> int:
        return len(self.failed)

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> dict[str, int]:
        """The API's `"s3": {"uploaded": n, "failed": m}`."""
        return {"uploaded": self.n_uploaded, "failed": self.n_failed}


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class S3BlobStore:
    """A BlobStore over one bucket; keys are full object keys (put them under `prefix`)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        prefix: str = "sam2-api-masks/",
        url_mode: str = "public",
        public_base_url: str | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        presign_seconds: int = 3600,
        acl: str | None = None,
    ):
        if url_mode not in URL_MODES:
            raise InvalidInput(f"S3_URL_MODE must be one of {', '.join(URL_MODES)}; got {url_mode!r}.")
        if not bucket:
            raise InvalidInput("An S3 bucket name is required.")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.url_mode = url_mode
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self.region = region or "us-east-1"
        self.presign_seconds = presign_seconds
        self.acl = acl
        self._issued_lock = threading.Lock()
        self._issued: tuple[str, set[str]] = ("", set())

    @classmethod
    def from_settings(cls, settings: Settings, session: boto3.session.Session | None = None) -> S3BlobStore | None:
        """The store the settings describe, or None when no bucket is configured."""
        if not settings.s3_bucket:
            return None
        return cls(
            make_s3_client(settings, session),
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            url_mode=settings.s3_url_mode,
            public_base_url=settings.s3_public_base_url,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.aws_region,
            presign_seconds=settings.s3_presign_seconds,
            acl=settings.s3_object_acl,
        )

    def __repr__(self) -> str:
        where = self.endpoint_url or self.region
        return f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r}, at={where!r}, urls={self.url_mode!r})"

    def _error(self, exc: Exception, action: str, key: str = "") -> StorageError | NotFound:
        return translate_error(exc, bucket=self.bucket, action=action, key=key, endpoint=self.endpoint_url)

    # ---- keys and URLs ---------------------------------------------------------------------
    def new_key(self, ext: str = ".png", now: _dt.datetime | None = None) -> str:
        """`{prefix}{YYYYMMDD_HHMMSS}_{8 hex}{ext}`, never repeated by this store."""
        stamp = f"{(now or _dt.datetime.now(_dt.UTC)):%Y%m%d_%H%M%S}"
        with self._issued_lock:
            if self._issued[0] != stamp:
                self._issued = (stamp, set())
            seen = self._issued[1]
            while (suffix := secrets.token_hex(4)) in seen:
                pass  # 32 random bits: a repeat within one second is rare, but a batch is large
            seen.add(suffix)
        return f"{self.prefix}{stamp}_{suffix}{ext}"

    def new_mask_key(self, now: _dt.datetime | None = None) -> str:
        """A fresh mask key in the old service's form: `{prefix}{YYYYMMDD_HHMMSS}_{8 hex}.png`."""
        return self.new_key(".png", now)

    def url_for(self, key: str) -> str:
        """The URL a browser fetches the object at (a fresh presigned GET URL in presigned mode)."""
        check_key(key)
        if self.url_mode == "presigned":
            try:
                return self.client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.presign_seconds
                )
            except _boto_errors() as exc:
                raise self._error(exc, "sign a download link", key) from exc
        path = quote(key, safe="/-_.~")
        if self.public_base_url:
            return f"{self.public_base_url}/{path}"
        if self.endpoint_url:
            return f"{self.endpoint_url}/{self.bucket}/{path}"
        return f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{path}"

    # ---- BlobStore -------------------------------------------------------------------------
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Upload one object (ACL only when S3_OBJECT_ACL is set: new buckets reject ACLs)."""
        extra = {"ACL": self.acl} if self.acl else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=check_key(key), Body=data, ContentType=content_type, **extra)
        except _boto_errors() as exc:
            raise self._error(exc, "upload", key) from exc

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=check_key(key))
            return response["Body"].read()
        except _boto_errors() as exc:
            raise self._error(exc, "download", key) from exc

    def content_type(self, key: str) -> str:
        """The object's stored Content-Type."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=check_key(key))["ContentType"]
        except _boto_errors() as exc:
            raise self._error(exc, "read object details", key) from exc

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error (S3 deletes are idempotent)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=check_key(key))
        except _boto_errors() as exc:
            raise self._error(exc, "delete", key) from exc

    def keys(self) -> Iterator[str]:
        """Every object key under the prefix."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"]
        except _boto_errors() as exc:
            raise self._error(exc, "list objects") from exc

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove many objects with batched DeleteObjects; raises StorageError naming how many remain."""
        keys = list(dict.fromkeys(check_key(k) for k in keys))
        errors: list[tuple[str, str]] = []
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except _boto_errors() as exc:
                raise self._error(exc, f"delete {len(keys) - start} objects") from exc
            errors += [(e.get("Key", "?"), e.get("Code", "unknown")) for e in response.get("Errors", [])]
        if errors:
            codes = ", ".join(f"{c} ×{n}" for c, n in Counter(c for _, c in errors).most_common())
            raise StorageError(
                f"{len(errors)} of {len(keys)} objects could not be deleted from S3 bucket '{self.bucket}' ({codes})."
            )

    # ---- health ----------------------------------------------------------------------------
    def check(self) -> tuple[bool, str]:
        """(ok, a sentence for the status line and the log); never raises, never shows secrets."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except _boto_errors() as exc:
            err = self._error(exc, "read the bucket")
            if _status_only(exc):
                err = self._detail(exc, err)
            return False, f"S3 uploads will fail: {err.message}"
        where = f" at {self.endpoint_url}" if self.endpoint_url else f" ({self.region})"
        return True, (
            f"S3 bucket '{self.bucket}'{where} is reachable; masks go under '{self.prefix}' with {self.url_mode} URLs."
        )

    def _detail(self, exc: Exception, fallback: StorageError | NotFound) -> StorageError | NotFound:
        """HEAD answers carry no error code: ask once more with a GET to learn which one it was."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except _boto_errors() as detail:
            better = self._error(detail, "list the bucket")
            return fallback if _status_only(detail) else better
        return fallback

    # ---- batch upload ----------------------------------------------------------------------
    def upload_many(
        self,
        items: Iterable[tuple[str, bytes]],
        *,
        workers: int = UPLOAD_WORKERS,
        progress: Callable[[int, int], None] | None = None,
        content_type: str | None = None,
    ) -> UploadReport:
        """Upload (key, bytes) items on a bounded pool; every item ends uploaded or failed, nothing raises.

        content_type None guesses from each key's extension. Once a failure shows the whole bucket is
        unusable (credentials, permission, missing bucket, endpoint down), or STOP_AFTER_HANGS uploads in
        a row found the endpoint hung (no answer in time, broken connections), the items not yet started
        are marked failed with that reason instead of each paying for the same error (or timeout); the
        report's `stopped` says why. `progress(done, total)` is called from the calling thread.
        """
        items = list(items)
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise InvalidInput("upload_many was given the same key twice: each object needs its own key.")
        total = len(items)
        stop_reason: list[str] = []
        state = threading.Condition()
        hangs = 0  # uploads in a row (since the last success) that found the endpoint hung
        in_flight = 0

        def settle(outcome: str, reason: str = "") -> None:
            """Count an upload's outcome ("ok", "hung", "down" or "failed"); maybe stop the batch."""
            nonlocal hangs, in_flight
            with state:
                in_flight -= 1
                hangs = 0 if outcome == "ok" else hangs + 1 if outcome == "hung" else hangs
                if not stop_reason and (outcome == "down" or hangs >= STOP_AFTER_HANGS):
                    stop_reason.append(reason)
                state.notify_all()

        def upload(key: str, data: bytes) -> str | None:
            nonlocal in_flight
            with state:
                # After a hang, start nothing new while the uploads in flight show whether S3 is hung.
                while hangs and in_flight and not stop_reason:
                    state.wait()
                if stop_reason:
                    return f"Not attempted (an earlier upload failed): {stop_reason[0]}"
                in_flight += 1
            ctype = content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"
            try:
                self.put(key, data, ctype)
            except S3Unavailable as exc:
                settle("down", exc.message)
                return exc.message
            except S3Unresponsive as exc:
                settle("hung", exc.message)
                return exc.message
            except StorageError as exc:
                settle("failed")
                return exc.message
            except BaseException:
                settle("failed")
                raise
            settle("ok")
            return None

        failed: dict[str, str] = {}
        done = 0
        if progress is not None:
            progress(0, total)
        if total:
            with ThreadPoolExecutor(max_workers=max(1, min(workers, total)), thread_name_prefix="s3-upload") as pool:
                futures = {pool.submit(upload, k, d): k for k, d in items}
                for future in as_completed(futures):
                    key = futures[future]
                    try:
                        reason = future.result()
                    except Exception as exc:  # a bug, not an S3 failure: keep the batch going, log loudly
                        log.exception("S3 upload of %s failed unexpectedly", key)
                        reason = f"Unexpected error ({type(exc).__name__})."
                    if reason is not None:
                        failed[key] = reason
                    done += 1
                    if progress is not None:
                        progress(done, total)
        report = UploadReport(
            tuple(k for k in keys if k not in failed),
            {k: failed[k] for k in keys if k in failed},
            stop_reason[0] if stop_reason else "",
        )
        _log_failures(report, self.bucket)
        return report


def _status_only(exc: Exception) -> bool:
    """A ClientError whose code is only the HTTP status (a HEAD answer)."""
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code", "")).isdigit()


def _log_failures(report: UploadReport, bucket: str) -> None:
    """One warning per distinct reason (never 200 identical lines); object keys only, never credentials."""
    if not report.failed:
        return
    total = report.n_uploaded + report.n_failed
    for reason, n in Counter(report.failed.values()).most_common():
        example = next(k for k, r in report.failed.items() if r == reason)
        log.warning("S3: %d of %d uploads to bucket '%s' failed (e.g. %s): %s", n, total, bucket, example, reason)
