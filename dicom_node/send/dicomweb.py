"""Send results to a DICOMweb service with STOW-RS (dicomweb-client), reporting every outcome.

:func:`send_files` posts instances in batches of ``max_instances_per_request`` to
``{url}/studies`` and returns one :class:`~dicom_node.send.result.ExportResult` per file, in
order, never raising for what the network or the server does:

* an instance the answer lists in its ReferencedSOPSequence is stored (a WarningReason makes
  it ``ok`` with a ``warning 0x....`` reason);
* one in its FailedSOPSequence failed with its FailureReason (``failure 0xA700 (Refused: Out of
  Resources)``), whatever the HTTP status (200, 202, 409, 400);
* one the answer does not list at all is not confirmed, which is a failure too: Orthanc's
  DICOMweb plugin 1.7 answers HTTP 200 with both sequences empty when its storage is full;
* an HTTP error without a DICOM answer (401, 403, 404, 413, 5xx), a connection that cannot be
  made, a TLS certificate that does not verify or an answer that does not come within the
  timeout fails every instance of the batch with one sentence saying what to check.

Retries and backoff belong to the caller (the worker's ``export_retries``), exactly as for
C-STORE: dicomweb-client's own retrying is switched off so that a job never sleeps inside it.
Credentials come from the destination's ``auth`` (environment variable or file, read at each
send) and appear in no log line and no reason.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicom_node.config import DicomwebAuth, DicomwebDestination
from dicom_node.send.result import ExportResult

LOGGER = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
"""Seconds to connect and between bytes of the answer, when neither caller nor config say."""

MAX_REQUEST_BYTES = 256 * 2**20
"""A batch is cut before the files it holds pass this many bytes (one file may be larger)."""

MAX_RESPONSE_BYTES = 16 * 2**20
"""The most of a STOW-RS answer read (decoded); a longer one is refused unread past that."""

MAX_ERROR_TEXT = 160
"""Characters of a server's own error message quoted in a reason, at most."""

SECRET_MAX_BYTES = 8192
"""A password or token file larger than this is refused (it is not a secret but a mistake)."""

_HTTP_REASONS: dict[int, str] = {
    400: "the service could not read the request (HTTP 400 Bad Request)",
    401: "authentication refused (HTTP 401): check the destination's auth (user, password "
    "or token)",
    403: "access denied (HTTP 403): the account may not store instances",
    404: "no STOW-RS service at this url (HTTP 404): check the destination's url, the part "
    "before /studies (e.g. http://pacs:8042/dicom-web)",
    405: "the url does not accept STOW-RS (HTTP 405): check the destination's url",
    409: "the service refused the instances (HTTP 409 Conflict)",
    413: "the request is too large for the service (HTTP 413): lower max_instances_per_request",
    415: "the service does not accept application/dicom (HTTP 415)",
    429: "the service is busy (HTTP 429 Too Many Requests); will retry",
    503: "the service is unavailable (HTTP 503); will retry",
}
"""What an HTTP status without a per-instance answer means, in words a person can act on."""


class SecretError(ValueError):
    """A destination's password or token cannot be read; the message names the variable or file,
    never the secret."""


def _first_line(path: Path) -> str:
    try:
        if path.stat().st_size > SECRET_MAX_BYTES:
            raise SecretError(f"secret file {path} is larger than {SECRET_MAX_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecretError(f"cannot read secret file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecretError(f"secret file {path} is not UTF-8 text") from None
    line = (text.splitlines() or [""])[0].strip()
    if not line:
        raise SecretError(f"secret file {path} is empty")
    return line


def read_secret(env: str | None, file: Path | None) -> str:
    """Return a secret from environment variable ``env`` or the first line of ``file``.

    Raises
    ------
    SecretError
        The variable is unset or empty, or the file is missing, unreadable, empty or too large.
    """
    if env is not None:
        value = os.environ.get(env, "").strip()
        if not value:
            raise SecretError(f"environment variable {env} (named by auth) is not set")
        return value
    if file is not None:
        return _first_line(file)
    raise SecretError("auth names neither an environment variable nor a file")


class AnswerTooLarge(requests.RequestException):
    """The service's answer is longer than :data:`MAX_RESPONSE_BYTES`."""


def _bounded(response: requests.Response, *args: object, **kwargs: object) -> requests.Response:
    """Response hook: read the body here, at most :data:`MAX_RESPONSE_BYTES` of it.

    requests runs hooks before it reads the body, and would read all of it; a service that
    answers without end must not exhaust the node's memory.
    """
    body = response.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
    if len(body) > MAX_RESPONSE_BYTES:
        response.close()
        raise AnswerTooLarge(f"answer longer than {MAX_RESPONSE_BYTES} bytes")
    response._content = body  # what requests itself does once it has read a body
    response._content_consumed = True
    return response


def _session(destination: DicomwebDestination) -> requests.Session:
    """A requests session with the destination's credentials and TLS verification."""
    session = requests.Session()
    session.verify = str(destination.ca) if destination.ca is not None else destination.verify
    session.trust_env = False  # a proxy from the environment must not see results or tokens
    session.hooks["response"] = [_bounded]
    auth: DicomwebAuth | None = destination.auth
    if auth is not None and auth.type == "basic":
        session.auth = (auth.username or "", read_secret(auth.password_env, auth.password_file))
    elif auth is not None:
        session.headers["Authorization"] = "Bearer " + read_secret(auth.token_env, auth.token_file)
    return session


def _status_text(code: int) -> str:
    """``failure 0xA700 (Refused: Out of Resources)`` or ``warning 0xB000 (...)``."""
    known = STORAGE_SERVICE_CLASS_STATUS.get(code)
    if known is not None:
        meaning = known[1]
    elif 0xA700 <= code <= 0xA7FF:
        meaning = "Refused: Out of Resources"
    elif 0xA900 <= code <= 0xA9FF:
        meaning = "Data Set does not match SOP Class"
    elif 0xC000 <= code <= 0xCFFF:
        meaning = "Cannot understand"
    else:
        meaning = "no meaning known"
    try:
        category = code_to_category(code).lower()
    except (TypeError, ValueError):
        category = "status"
    return f"{category} 0x{code:04X} ({meaning})"


def _server_message(response: requests.Response) -> str:
    """The service's own short error text (Orthanc's JSON ``Message``), or ``""``."""
    body = response.content[: 64 * 1024]
    text = ""
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            text = str(data.get("Message") or data.get("message") or data.get("error") or "")
    except ValueError:
        kind = response.headers.get("Content-Type", "")
        if kind.startswith("text/plain"):
            text = body.decode("utf-8", "replace")
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_TEXT:
        text = text[: MAX_ERROR_TEXT - 3] + "..."
    return f" (the service says: {text})" if text else ""


def _answer(response: requests.Response | None) -> Dataset | None:
    """The STOW-RS answer as a Dataset, or None when there is none (Orthanc sends its 409 answer
    without a Content-Type, so the body is tried as DICOM JSON whatever the header says)."""
    if response is None or not response.content:
        return None
    try:
        data = json.loads(response.content)
        return Dataset.from_json(data) if isinstance(data, dict) else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _per_instance(
    datasets: Sequence[Dataset], answer: Dataset | None, http: int, where: str
) -> list[ExportResult]:
    """One result per dataset from a STOW-RS answer (see the module docstring)."""
    referenced = {
        str(item.get("ReferencedSOPInstanceUID", "")): item
        for item in (answer.get("ReferencedSOPSequence") or [] if answer is not None else [])
    }
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): item
        for item in (answer.get("FailedSOPSequence") or [] if answer is not None else [])
    }
    listed = answer is not None and (
        "ReferencedSOPSequence" in answer or "FailedSOPSequence" in answer
    )
    results = []
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        if uid in failed:
            code = failed[uid].get("FailureReason")
            text = _status_text(int(code)) if code is not None else "failure (no reason given)"
            results.append(
                ExportResult(False, None if code is None else int(code), f"{text} (HTTP {http})")
            )
        elif uid in referenced:
            code = referenced[uid].get("WarningReason")
            if code is None:
                results.append(ExportResult(True, 0x0000, "stored"))
            else:
                results.append(ExportResult(True, int(code), _status_text(int(code))))
        elif listed or http >= 300:
            results.append(
                ExportResult(
                    False,
                    None,
                    f"{where} did not confirm the instance (HTTP {http}, the answer lists it "
                    "neither as stored nor as failed; see the service's log, e.g. full storage)",
                )
            )
        else:  # HTTP 200 without a body: the standard's success for every instance
            results.append(ExportResult(True, None, f"stored (HTTP {http}, no per-item answer)"))
    return results


def _batches(
    items: Sequence[tuple[int, Dataset, int]], per_request: int
) -> list[list[tuple[int, Dataset, int]]]:
    """Cut ``(index, dataset, size)`` into requests of at most ``per_request`` instances and
    :data:`MAX_REQUEST_BYTES`."""
    batches: list[list[tuple[int, Dataset, int]]] = []
    current: list[tuple[int, Dataset, int]] = []
    size = 0
    for item in items:
        if current and (len(current) >= per_request or size + item[2] > MAX_REQUEST_BYTES):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += item[2]
    if current:
        batches.append(current)
    return batches


def store_datasets(
    datasets: Sequence[Dataset],
    destination: DicomwebDestination,
    *,
    timeout: float | None = None,
    study_uid: str | None = None,
) -> list[ExportResult]:
    """STOW-RS ``datasets`` in one request; one result per dataset, in order.

    Parameters
    ----------
    datasets
        The instances (SOPInstanceUID required).
    destination
        The service: url, auth, TLS verification.
    timeout
        Seconds to connect and between bytes of the answer; the destination's ``timeout`` wins,
        then this, then :data:`DEFAULT_TIMEOUT`.
    study_uid
        Post to ``{url}/studies/{study_uid}`` (the service then refuses instances of another
        study); ``None`` posts to ``{url}/studies``.

    Returns
    -------
    list of ExportResult
        See the module docstring for every outcome. Never raises for network or server
        trouble, nor for a secret that cannot be read.
    """
    if not datasets:
        return []
    where = destination.url
    seconds = destination.timeout or timeout or DEFAULT_TIMEOUT

    def every(reason: str) -> list[ExportResult]:
        return [ExportResult(False, None, reason) for _ in datasets]

    try:
        session = _session(destination)
    except SecretError as exc:
        LOGGER.warning("export to %s: %s", where, exc)
        return every(f"{where}: {exc}")
    try:
        client = DICOMwebClient(where, session=session, timeout=seconds)
        client.set_http_retry_params(retry=False)
        answer = client.store_instances(list(datasets), study_instance_uid=study_uid)
        results = _per_instance(datasets, answer, 200, where)
    except requests.HTTPError as exc:
        response = exc.response
        status = response.status_code if response is not None else 0
        refusal = _answer(response)
        if refusal is not None and "FailedSOPSequence" in refusal:
            results = _per_instance(datasets, refusal, status, where)
        else:
            text = _HTTP_REASONS.get(status, f"HTTP {status} from the service")
            extra = _server_message(response) if response is not None else ""
            results = every(f"{where}: {text}{extra}")
    except AnswerTooLarge:
        results = every(
            f"{where}: the service's answer is longer than {MAX_RESPONSE_BYTES} bytes "
            "(not a STOW-RS answer); check the url"
        )
    except requests.exceptions.SSLError:
        results = every(
            f"{where}: TLS certificate of the service does not verify; give its CA in the "
            "destination's 'ca' (or fix the url's host name)"
        )
    except requests.exceptions.Timeout:
        results = every(f"{where}: no response within {seconds:g} s (STOW-RS timed out)")
    except requests.exceptions.ConnectionError:
        results = every(f"cannot connect to {where} (refused, unreachable or timed out)")
    except Exception as exc:  # never raise for the service's doing: turn it into an outcome
        LOGGER.exception("export to %s failed", where)
        results = every(f"{where}: {type(exc).__name__}: {str(exc)[:MAX_ERROR_TEXT]}")
    finally:
        session.close()
    ok = sum(r.ok for r in results)
    log = LOGGER.info if ok == len(results) else LOGGER.warning
    log("export to %s: %d of %d instance(s) stored", where, ok, len(results))
    for result in results:
        if not result.ok:
            LOGGER.warning("export to %s: %s", where, result.reason)
            break  # one line per request: a batch usually fails for one reason
    return results


def send_files(
    paths: Sequence[str | Path],
    destination: DicomwebDestination,
    *,
    timeout: float | None = None,
) -> list[ExportResult]:
    """Read DICOM files and STOW-RS them in batches; one result per path, in order.

    Returns
    -------
    list of ExportResult
        As :func:`store_datasets`; a file that is missing or not DICOM gets ``ok=False`` and a
        ``cannot read`` reason, and the others are still sent.
    """
    results: list[ExportResult | None] = [None] * len(paths)
    readable: list[tuple[int, Dataset, int]] = []
    for index, path in enumerate(paths):
        try:
            size = Path(path).stat().st_size
            readable.append((index, dcmread(path), size))
        except Exception as exc:
            LOGGER.warning("export: cannot read %s: %s", path, exc)
            results[index] = ExportResult(False, None, f"cannot read {Path(path).name}: {exc}")
    for batch in _batches(readable, destination.max_instances_per_request):
        outcomes = store_datasets([ds for _, ds, _ in batch], destination, timeout=timeout)
        for (index, _, _), outcome in zip(batch, outcomes, strict=True):
            results[index] = outcome
    return [r if r is not None else ExportResult(False, None, "not sent") for r in results]


__all__ = ["DEFAULT_TIMEOUT", "SecretError", "read_secret", "send_files", "store_datasets"]
