"""The NetBird management-API source: fetch the account from the REST API.

Polls `GET /api/policies`, `/api/groups`, `/api/peers` and, only when some policy
references posture checks, `/api/posture-checks`, with `Authorization: Token ...`.
TLS is verified (system store, or a CA file for self-hosted managements); redirects are
not followed (a redirect must never carry the token elsewhere).

Faults — 401/403, other HTTP errors, 5xx, timeouts, connection and TLS errors, malformed
JSON, a token that sees only part of the account (checked against the `All` group), the
local peer missing — never change what is enforced: the last good state stays, one log
line is written when a cause starts (and one when the API recovers), and every
occurrence is counted (`Faults`). The token never appears in logs or error messages.
Admission and compilation are agent.pipeline.NetbirdPipeline's.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import stat
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agent.inventory import IPAddress
from agent.sources.backoff import Backoff

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

DEFAULT_URL = "https://api.netbird.io"
DEFAULT_INTERVAL = 30.0
TOKEN_ENV = "NETBIRD_TOKEN"
# Fault causes, the keys of NetbirdPipeline.errors.
CAUSES = ("auth", "http", "server", "timeout", "connection", "tls", "malformed", "partial",
          "local_peer", "internal")


class TokenError(ValueError):
    """The token cannot be loaded; the message never contains the token."""


class FetchError(Exception):
    """One poll failed; `cause` is one of CAUSES. Messages never contain the token."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


def load_token(token_file: str | os.PathLike[str] | None = None,
               env: Mapping[str, str] | None = None) -> str:
    """The API token from `token_file` (mode must deny group and others) or $NETBIRD_TOKEN."""
    env = os.environ if env is None else env
    if token_file:
        path = Path(token_file)
        try:
            st = path.stat()
        except OSError as e:
            raise TokenError(f"cannot read token file {path}: {e.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenError(
                f"token file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o});"
                " run: chmod 600 " + str(path)
            )
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise TokenError(f"cannot read token file {path}: {type(e).__name__}") from None
        where = f"token file {path}"
    else:
        token = env.get(TOKEN_ENV, "").strip()
        where = f"${TOKEN_ENV}"
    if not token:
        raise TokenError(f"no NetBird API token: {where} is empty or unset")
    # A header value with whitespace or control characters would be refused by the HTTP
    # library with the value quoted in the error: check here, without echoing it.
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in token):
        raise TokenError(f"{where}: the token contains whitespace or non-printable characters")
    return token


class NetbirdClient:
    """GET JSON from the management API. Raises FetchError with a token-free message."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str = "",
        ca_file: str | None = None,
        timeout: float = 10.0,
        session: requests.Session | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"invalid NetBird management URL {url!r}")
        if parts.scheme == "http" and not _loopback(parts.hostname):
            raise ValueError(f"refusing plain http to {parts.hostname}: the token would travel in clear")
        if ca_file is not None and not Path(ca_file).is_file():
            raise ValueError(f"CA file {ca_file} does not exist")
        self.base = url.rstrip("/")
        if not self.base.endswith("/api"):
            self.base += "/api"
        self._token = token
        self.timeout = timeout
        if session is None:
            import requests  # here, not at module level: ~0.1 s off every other source's start-up

            session = requests.Session()
        self.session = session
        self.session.trust_env = False  # no ~/.netrc credentials, no proxy env surprises
        self.session.verify = ca_file if ca_file else True
        self.session.headers.update({"Accept": "application/json",
                                     "User-Agent": "stockade (NetBird policy enforcer)"})

    def __repr__(self) -> str:  # never show the token
        return f"NetbirdClient({self.base!r})"

    def location(self, path: str) -> str:
        return f"{self.base}/{path}"

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "<token>") if self._token else text

    def get(self, path: str) -> Any:
        import requests

        url = self.location(path)
        try:
            resp = self.session.get(url, timeout=self.timeout, allow_redirects=False,
                                    headers={"Authorization": f"Token {self._token}"})
        except requests.exceptions.SSLError as e:
            raise FetchError("tls", self._scrub(f"GET {url}: TLS verification failed: {_reason(e)}")) from None
        except requests.exceptions.Timeout:
            raise FetchError("timeout", f"GET {url}: no answer within {self.timeout:g}s") from None
        except requests.exceptions.RequestException as e:
            raise FetchError("connection", self._scrub(f"GET {url}: {_reason(e)}")) from None
        code = resp.status_code
        if code in (401, 403):
            raise FetchError("auth", f"GET {url}: HTTP {code}: token rejected or lacks permission")
        if code >= 500:
            raise FetchError("server", f"GET {url}: HTTP {code} from the management server")
        if code != 200:
            raise FetchError("http", f"GET {url}: unexpected HTTP {code}")
        try:
            return resp.json()
        except ValueError:
            raise FetchError("malformed", f"GET {url}: response is not JSON") from None


def _reason(e: Exception) -> str:
    """The innermost reason of a requests/urllib3 exception, on one line."""
    reason: BaseException = e
    for _ in range(10):
        nxt = getattr(reason, "reason", None) or reason.__cause__ or reason.__context__
        if nxt is None or nxt is reason or not isinstance(nxt, BaseException):
            break
        reason = nxt
    return f"{type(reason).__name__}: {reason}".splitlines()[0][:300]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def interface_addresses(interface: str) -> list[IPAddress]:
    """The addresses on `interface`, from `ip -j addr show dev IFACE`."""
    try:
        out = subprocess.run(["ip", "-j", "addr", "show", "dev", interface], capture_output=True,
                             text=True, timeout=5, check=True).stdout
        data = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise FetchError("local_peer", f"cannot read the addresses of {interface}: {_reason(e)}") from None
    addrs = []
    for link in data if isinstance(data, list) else []:
        for a in link.get("addr_info", []) if isinstance(link, dict) else []:
            try:
                addrs.append(ipaddress.ip_address(a.get("local", "")))
            except ValueError:
                continue
    return addrs


@dataclass
class RawAccount:
    """The API's answers as delivered (lists of JSON objects)."""

    policies: list[Any] = field(default_factory=list)
    groups: list[Any] = field(default_factory=list)
    peers: list[Any] = field(default_factory=list)
    posture_checks: list[Any] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"policies": self.policies, "groups": self.groups, "peers": self.peers,
                "posture_checks": self.posture_checks}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RawAccount:
        return cls(**{k: list(data.get(k) or []) for k in ("policies", "groups", "peers", "posture_checks")})


class NetbirdSource:
    """One consistent read of the account, or FetchError."""

    name = "netbird"

    def __init__(self, client: NetbirdClient) -> None:
        self.client = client

    def _list(self, path: str) -> list[Any]:
        data = self.client.get(path)
        if not isinstance(data, list):
            raise FetchError("malformed", f"GET {self.client.location(path)}: expected a JSON array, "
                             f"got {type(data).__name__}")
        return data

    def fetch(self) -> RawAccount:
        policies = self._list("policies")
        groups = self._list("groups")
        peers = self._list("peers")
        referenced = any(isinstance(p, Mapping) and p.get("source_posture_checks") for p in policies)
        checks = self._list("posture-checks") if referenced else []
        return RawAccount(policies, groups, peers, checks)


class Faults:
    """Source faults: counted by cause, logged once when a cause starts and once on recovery.

    Fetch faults and the faults admission finds in what was fetched (a partial view, the
    local peer missing) are the same to an operator: the last good state stays.
    """

    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()  # fault cause -> occurrences
        self.polls: Counter[str] = Counter()  # "success" | "error"
        self.last_error: FetchError | None = None

    def failed(self, e: FetchError, kept: str) -> None:
        """Count one fault; `kept` says what stays enforced (for the log line)."""
        self.polls["error"] += 1
        self.errors[e.cause] += 1
        if self.last_error is None or self.last_error.cause != e.cause:
            log.error("NetBird API fault (%s): %s; %s", e.cause, e, kept)
        else:
            log.debug("NetBird API fault persists (%s): %s", e.cause, e)
        self.last_error = e

    def internal(self) -> None:
        """A bug in a poll: counted, logged with its traceback by the caller."""
        self.errors["internal"] += 1
        self.last_error = FetchError("internal", "unexpected error")

    def succeeded(self) -> None:
        self.polls["success"] += 1
        if self.last_error is not None:
            log.info("NetBird API answers again (after %s)", self.last_error.cause)
            self.last_error = None




class Poller:
    """The poll loop: every `interval` seconds (+-jitter), backing off exponentially
    (the shared Backoff) while `faults` has a fault pending."""

    def __init__(self, faults: Faults, interval: float = DEFAULT_INTERVAL, jitter: float = 0.1,
                 max_backoff: float = 300.0) -> None:
        self.faults = faults
        self.interval = interval
        self.jitter = jitter
        self.backoff = Backoff(min(5.0, interval), max(max_backoff, interval), spread=jitter)

    def next_delay(self, failures: int) -> float:
        """Seconds until the next poll: the interval, or exponential backoff after faults."""
        if failures == 0:
            return max(0.05, self.interval * (1 + random.uniform(-self.jitter, self.jitter)))
        return max(0.05, self.backoff.delay(failures - 1))

    def start(self, poll: Callable[[], bool], on_change: Callable[[], None]) -> Callable[[], None]:
        """Call `poll` (fetch; True: something to hand on) on a thread, `on_change` when it
        says so. Returns stop()."""
        stop = threading.Event()

        def loop() -> None:
            failures = 0
            while not stop.is_set():
                try:
                    changed = poll()
                except Exception:  # a bug must not end polling silently
                    log.exception("NetBird poll failed unexpectedly; last good state stays")
                    changed = False
                    self.faults.internal()
                failures = 0 if self.faults.last_error is None else failures + 1
                if changed:
                    on_change()
                stop.wait(self.next_delay(failures))

        t = threading.Thread(target=loop, name="netbird-poll", daemon=True)
        t.start()

        def stop_poll() -> None:
            stop.set()
            t.join(timeout=5)

        return stop_poll
