"""Who may call what, checked on every HTTP request before any route runs.

Each request falls in one endpoint group, by its path:

- health: ``/v2/health/*``, always open (probes and load balancers carry no key);
- inference: ``POST /v2/models/{m}[/versions/{v}]/infer`` and ``.../batchnorm``;
- model_control: ``/v2/repository/*`` (the index, load and unload);
- metrics: ``/metrics``;
- metadata: everything else (server and model metadata, the API docs, the demo page).

With ``NORMSERVE_API_KEY`` set, the groups in ``NORMSERVE_API_KEY_PROTECTS`` need the key, as
``Authorization: Bearer <key>`` or in the ``NORMSERVE_API_KEY_HEADER`` header (``x-api-key``), compared in
constant time (``hmac.compare_digest``); without it the answer is 401. Load and unload also need
``NORMSERVE_MODEL_CONTROL=explicit`` (Triton's mode names; the default, none, answers 403), and they
refuse what a page on another origin can send without a CORS preflight: a body whose content type is
not ``application/json`` (415) and an ``Origin`` that is not this server's (403). So a browser page
elsewhere cannot unload a model even where no key is set.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from service.config import EndpointGroup, Settings
from service.errors import Forbidden, Unauthorized, UnsupportedMediaType

__all__ = ["Access", "endpoint_group"]

_INFERENCE = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/(?:infer|batchnorm)")
_CONTROL = re.compile(r"/v2/repository/models/[^/]+/(?:load|unload)")


def endpoint_group(path: str) -> EndpointGroup | None:
    """The group a path belongs to; None for health, which is always open."""
    if path.startswith("/v2/health/"):
        return None
    if _INFERENCE.fullmatch(path):
        return "inference"
    if path.startswith("/v2/repository/"):
        return "model_control"
    if path == "/metrics":
        return "metrics"
    return "metadata"


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((value for key, value in headers if key.lower() == name), None)


def _hostname(host: bytes | None) -> str | None:
    """The name in a Host header, without its port, lower case: ``[::1]:8000`` -> ``::1``."""
    if host is None:
        return None
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rpartition(":")[0] if text.count(":") == 1 else text


class Access:
    """The checks of one server's settings; ``check`` raises the ServeError a request gets, if any."""

    def __init__(self, settings: Settings) -> None:
        self.key = settings.api_key.get_secret_value().encode() if settings.api_key else None
        self.protects = settings.api_key_protects
        self.key_header = settings.api_key_header.encode()
        self.control = settings.model_control
        self.control_hosts = settings.control_hosts

    def check(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        if self.key is not None and endpoint_group(path) in self.protects:  # no key: nothing to sort on the hot path
            self._check_key(self.key, path, headers)
        # The prefix first: the regular expression costs a few times more, on every inference request.
        if method == "POST" and path.startswith("/v2/repository/") and _CONTROL.fullmatch(path):
            self._check_control(headers)

    def check_call(
        self, group: EndpointGroup | None, what: str, headers: list[tuple[bytes, bytes]], control: bool = False
    ) -> None:
        """``check`` for a call that has no HTTP path (a gRPC method named ``what``, its metadata as
        ``headers``): the key where ``group`` needs it, and for a ``control`` call (load, unload) model
        control's mode. The Host and Origin checks are for browsers, which cannot make gRPC calls."""
        if self.key is not None and group in self.protects:
            self._check_key(self.key, what, headers)
        if control:
            self._check_mode()

    def may_read(self, group: EndpointGroup, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether a request with ``headers`` may read what ``group`` guards (always, without a key)."""
        if self.key is None or group not in self.protects:
            return True
        try:
            self._check_key(self.key, "", headers)
        except Unauthorized:
            return False
        return True

    def _check_key(self, key: bytes, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        sent = _header(headers, self.key_header)
        authorization = _header(headers, b"authorization")
        if sent is None and authorization is not None and authorization[:7].lower() == b"bearer ":
            sent = authorization[7:].strip()
        how = f"'Authorization: Bearer <key>' or '{self.key_header.decode()}: <key>'"
        if sent is None:
            raise Unauthorized(f"{path} needs the server's API key: send it as {how}")
        if not hmac.compare_digest(sent, key):
            raise Unauthorized(f"the API key sent is not this server's; send the key it was started with, as {how}")

    def _check_control(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._check_mode()
        origin = _header(headers, b"origin")
        host = _header(headers, b"host")
        if self.control_hosts is not None and _hostname(host) not in self.control_hosts:
            named = "no Host header" if host is None else f"Host {host.decode('latin-1')[:100]!r}"
            raise Forbidden(
                f"a model control request with {named} is refused: this server answers model control for "
                f"{', '.join(sorted(self.control_hosts))} only (NORMSERVE_ALLOWED_HOSTS adds names; a web page "
                "that resolves its own name to this server sends that name)"
            )
        if origin is not None and (host is None or urlsplit(origin.decode("latin-1")).netloc.encode() != host):
            raise Forbidden(
                f"a model control request from another origin ({origin.decode('latin-1')}) is refused; "
                "send it from a client, not from a web page"
            )
        content_type = _header(headers, b"content-type")
        if content_type is not None and content_type.split(b";")[0].strip().lower() != b"application/json":
            raise UnsupportedMediaType(
                f"a model control request's body must be application/json (or absent), "
                f"got {content_type.decode('latin-1')!r}"
            )

    def _check_mode(self) -> None:
        if self.control != "explicit":
            raise Forbidden(
                "model control is off (NORMSERVE_MODEL_CONTROL=none): the served models are those the server "
                "started with; start it with NORMSERVE_MODEL_CONTROL=explicit to load and unload models at run time "
                "(POST /v2/repository/index still lists them)"
            )
