"""The NetBird management-API source: poll the REST API, keep the last good state.

Polls `GET /api/policies`, `/api/groups`, `/api/peers` and, only when some policy
references posture checks, `/api/posture-checks`, with `Authorization: Token ...`.
TLS is verified (system store, or a CA file for self-hosted managements); redirects are
not followed (a redirect must never carry the token elsewhere).

Faults — 401/403, other HTTP errors, 5xx, timeouts, connection and TLS errors, malformed
JSON, a token that sees only part of the account (checked against the `All` group), the
local peer missing — never change what is enforced: the last good state stays, one log
line is written when a cause starts (and one when the API recovers), and every
occurrence is counted in `NetbirdPipeline.errors`. The token never appears in logs or
error messages.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import random
import stat
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from agent.admission import LastGood
from agent.inventory import IPAddress, ObjectRef, Problem, RawPolicy
from agent.ir import Network, Program
from agent.pipeline import Snapshot
from agent.policy import netbird as nb
from agent.sources.kubeobjects import RawObject

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
        self.session = session or requests.Session()
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
        why = nb.partial_view(groups, peers)
        if why is not None:
            raise FetchError("partial", f"the token sees only part of the account ({why}); "
                             "use a token of a user who sees every peer")
        return RawAccount(policies, groups, peers, checks)


class _Store(LastGood):
    """Per-object last good versions, in memory; what it keeps goes into the state file."""

    def __init__(self) -> None:
        super().__init__(None)
        self.kept: dict[str, Mapping[str, Any]] = {}

    def replace(self, good: dict[str, Mapping[str, Any]]) -> None:
        super().replace(good)
        self.kept = dict(good)


_KINDS = (  # (kind, RawAccount attribute, API path)
    ("Policy", "policies", "policies"),
    ("Group", "groups", "groups"),
    ("Peer", "peers", "peers"),
    ("PostureCheck", "posture_checks", "posture-checks"),
)


class NetbirdPipeline:
    """Source -> admission -> semantics for the local NetBird peer; drives the Daemon.

    `snapshot()` returns the last good state (polling synchronously first when nobody
    is watching); before the first good state it returns the bootstrap program. `watch`
    polls every `interval` seconds (+-jitter), backing off exponentially on faults, and
    calls back when what must be enforced changed.
    """

    def __init__(
        self,
        source: NetbirdSource,
        *,
        peer_id: str | None = None,
        interface: str = nb.DEFAULT_INTERFACE,
        ranges: Sequence[Network] = nb.DEFAULT_RANGES,
        inbound_only: bool = False,
        interval: float = DEFAULT_INTERVAL,
        jitter: float = 0.1,
        max_backoff: float = 300.0,
        state_file: Path | None = None,
        address_lookup: Callable[[str], list[IPAddress]] = interface_addresses,
        readonly: bool = False,
    ) -> None:
        self.source = source
        self.peer_id = peer_id
        self.interface = interface
        self.ranges = tuple(ranges)
        self.inbound_only = inbound_only
        self.interval = interval
        self.jitter = jitter
        self.max_backoff = max(max_backoff, interval)
        self.state_file = state_file
        self.readonly = readonly  # explain/matrix read the enforcer's state, never write it
        self.address_lookup = address_lookup
        self.store = _Store()  # per-object last good versions (in memory; saved with the state)
        self.errors: Counter[str] = Counter()  # fault cause -> occurrences
        self.polls: Counter[str] = Counter()  # "success" | "error"
        self.ready = threading.Event()  # set at the first good state (API or state file)
        self.last_error: FetchError | None = None
        self._lock = threading.Lock()
        self._snapshot = Snapshot(nb.account_inventory(nb.Account(), ""), nb.bootstrap_program(interface))
        self._watching = False
        self._local_id: str | None = peer_id
        self._warned: set[str] = set()
        self._load_state()

    # ------------------------------------------------------------ state file

    def _load_state(self) -> None:
        """The state saved by a previous run, so a restart with the API down does not fall
        back to the bootstrap program — and enforces exactly what that run enforced: the
        saved answer is admitted again against the saved last good versions."""
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            data = json.loads(self.state_file.read_text())
            raw = RawAccount.from_json(data["account"])
            last_good = data.get("last_good", {})
            if not isinstance(last_good, dict) or not all(
                    isinstance(k, str) and isinstance(v, Mapping) for k, v in last_good.items()):
                raise ValueError("last_good is not a map of objects")
            self.store.replace(last_good)
            snap = self._build(raw, data.get("local_peer"))
        except (OSError, ValueError, KeyError, TypeError, FetchError) as e:
            self.store = _Store()
            log.warning("ignoring unusable NetBird state file %s: %s", self.state_file, _reason(e))
            return
        self._snapshot = snap
        self.ready.set()
        log.info("NetBird: enforcing the state saved in %s until the API answers", self.state_file)

    def _save_state(self, raw: RawAccount, local: str) -> None:
        """The admitted state: the answer and the last good versions admission kept (after
        this answer was admitted), from which _load_state rebuilds the same program."""
        if self.state_file is None or self.readonly:
            return
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.state_file.parent, prefix=".netbird-")
            with os.fdopen(fd, "w") as f:  # mkstemp creates it 0600
                json.dump({"account": raw.to_json(), "last_good": self.store.kept, "local_peer": local}, f)
            os.replace(tmp, self.state_file)
        except OSError as e:
            log.warning("cannot save NetBird state to %s: %s", self.state_file, e)

    # ------------------------------------------------------------ compile

    def _admit(self, raw: RawAccount, problems: list[Problem]) -> tuple[nb.Account, list[RawObject]]:
        """Validate every object; each invalid one keeps its last good version.

        Policies are read part by part (nb.read_policy): an invalid policy with a last good
        version enforces that version plus the drop rules of the invalid one (its invalid
        parts resolved fail-closed), so a broken drop never lets an accept win; without a
        last good version the invalid policy is enforced as read, fail-closed. An object
        without an id has no last good version: a policy's drops are still enforced.
        Duplicate ids are reported: every copy of a policy is reduced to its drops, a group
        or posture check becomes unknown (stricter side).
        """
        objects: list[RawObject] = []
        raw_ids: dict[str, set[str]] = {k: set() for k, _, _ in _KINDS}
        dups: dict[str, set[str]] = {k: set() for k, _, _ in _KINDS}
        anonymous: list[nb.Policy] = []
        copies: list[nb.Policy] = []  # later copies of a duplicated policy id
        for kind, attr, path in _KINDS:
            loc = self.source.client.location(path)
            for i, body in enumerate(getattr(raw, attr)):
                oid = body.get("id") if isinstance(body, Mapping) else None
                if not isinstance(oid, str) or not oid:
                    ref = ObjectRef(kind, "", f"[{i}]", "netbird", loc)
                    problems.append(Problem(ref, "id", "missing or not a string; object ignored" if kind != "Policy"
                                            or not isinstance(body, Mapping) else
                                            "missing or not a string; only its drop rules are enforced"))
                    if kind == "Policy" and isinstance(body, Mapping):
                        pol = nb.read_policy(RawPolicy(ref, body))
                        problems.extend(Problem(ref, e.field, e.message) for e in pol.problems[1:])
                        anonymous.append(dataclasses.replace(pol.drops_only(f"#{i}"), id=""))
                    continue
                if oid in raw_ids[kind]:
                    dups[kind].add(oid)
                    ref = ObjectRef(kind, "", oid, "netbird", loc)
                    problems.append(Problem(ref, "id", f"duplicate id (object [{i}]); " + (
                        "every copy enforces only its drop rules" if kind == "Policy" else "treated as invalid")))
                    if kind == "Policy":
                        pol = nb.read_policy(RawPolicy(ref, body))
                        problems.extend(Problem(ref, e.field, e.message) for e in pol.problems)
                        copies.append(pol.drops_only(f"#{i}"))
                    continue
                raw_ids[kind].add(oid)
                objects.append(RawObject(ObjectRef(kind, "", oid, "netbird", loc), body))
        invalid: dict[str, nb.Policy] = {}
        extra: list[Problem] = []  # the problems after the first of each invalid policy

        def parse(obj: RawObject) -> Any:
            kind = obj.ref.kind
            if kind == "Policy":
                pol = nb.read_policy(RawPolicy(obj.ref, obj.body))
                # The last good body itself (admission's fallback) is never rejected again.
                if pol.problems and obj.body is not self.store.get(obj.ref):
                    invalid[obj.ref.name] = pol
                    extra.extend(Problem(obj.ref, e.field, e.message) for e in pol.problems[1:])
                    raise pol.problems[0]  # reported by admission; the last good version stays
                return pol
            if kind == "Group":
                return nb.parse_group(obj.body)
            if kind == "Peer":
                return nb.parse_peer(obj.body)
            return nb.parse_posture_check(obj.body)

        admitted = self.store.admit(objects, parse, problems)
        problems.extend(extra)
        by_kind: dict[str, dict[str, Any]] = {k: {} for k, _, _ in _KINDS}
        in_force: dict[str, RawObject] = {}
        for obj, value in admitted:
            by_kind[obj.ref.kind][obj.ref.name] = value
            if obj.ref.kind == "Policy":
                in_force[obj.ref.name] = obj
        policies: list[nb.Policy] = []
        policy_objs: list[RawObject] = []
        for obj in objects:
            if obj.ref.kind != "Policy":
                continue
            name = obj.ref.name
            good: nb.Policy | None = by_kind["Policy"].get(name)
            bad = invalid.get(name)
            dup = name in dups["Policy"]
            if good is not None:
                policies.append(good.drops_only("") if dup else good)
                policy_objs.append(in_force[name])
            if bad is not None:
                if good is None and not dup:
                    policies.append(bad)
                    policy_objs.append(obj)
                else:
                    policies.append(bad.drops_only("~invalid"))
        policies.extend(copies)
        policies.extend(anonymous)
        groups = {k: v for k, v in by_kind["Group"].items() if k not in dups["Group"]}
        checks = {k: v for k, v in by_kind["PostureCheck"].items() if k not in dups["PostureCheck"]}
        account = nb.Account(
            policies=tuple(policies),
            groups=groups,
            peers=by_kind["Peer"],
            posture_checks=checks,
            unknown_groups=frozenset(raw_ids["Group"] - set(groups)),
            unknown_posture_checks=frozenset(raw_ids["PostureCheck"] - set(checks)),
        )
        return account, policy_objs

    def _local_peer(self, account: nb.Account, saved: str | None = None) -> str:
        if self.peer_id is not None:
            if self.peer_id not in account.peers:
                raise FetchError("local_peer", f"peer id {self.peer_id} (--netbird-peer-id) is not in /api/peers")
            return self.peer_id
        try:
            addrs = set(self.address_lookup(self.interface))
        except FetchError:
            if saved and saved in account.peers:
                return saved  # interface down, e.g. while NetBird restarts: keep the peer we knew
            raise
        for p in account.peers.values():
            if addrs.intersection(p.ips):
                return p.id
        shown = ", ".join(sorted(map(str, addrs))) or "none"
        raise FetchError("local_peer", f"no peer in /api/peers has an address of {self.interface} ({shown})")

    def _build(self, raw: RawAccount, saved_local: str | None = None) -> Snapshot:
        problems: list[Problem] = []
        account, policy_objs = self._admit(raw, problems)
        local = self._local_peer(account, saved_local or self._local_id)
        compiled = nb.compile_account(account, local, interface=self.interface, ranges=self.ranges,
                                      inbound_only=self.inbound_only)
        inv = nb.account_inventory(account, local, self.interface, problems)
        for obj in policy_objs:
            inv.policies[obj.ref.key] = RawPolicy(obj.ref, obj.body)
        inv.context["netbird.warnings"] = compiled.warnings
        self._report_warnings(compiled.warnings)
        self._local_id = local
        return Snapshot(inv, compiled.program)

    def _report_warnings(self, warnings: list[Problem]) -> None:
        now = {str(w) for w in warnings}
        for text in sorted(now - self._warned):
            log.warning("NetBird policy warning: %s", text)
        self._warned = now

    # ------------------------------------------------------------ polling

    def refresh(self) -> bool:
        """Poll once. True if the state changed (a new program or new problems)."""
        try:
            raw = self.source.fetch()
            snap = self._build(raw)
        except FetchError as e:
            self.polls["error"] += 1
            self.errors[e.cause] += 1
            if self.last_error is None or self.last_error.cause != e.cause:
                kept = "last good state stays in force" if self.ready.is_set() else \
                    "inbound on " + self.interface + " stays denied (no good state yet)"
                log.error("NetBird API fault (%s): %s; %s", e.cause, e, kept)
            else:
                log.debug("NetBird API fault persists (%s): %s", e.cause, e)
            self.last_error = e
            return False
        self.polls["success"] += 1
        if self.last_error is not None:
            log.info("NetBird API answers again (after %s)", self.last_error.cause)
            self.last_error = None
        self._save_state(raw, snap.inventory.context[nb.CTX_LOCAL_PEER])
        with self._lock:
            old = self._snapshot
            self._snapshot = snap
        first = not self.ready.is_set()
        self.ready.set()
        return first or old.program != snap.program or [str(p) for p in old.problems] != [
            str(p) for p in snap.problems
        ]

    def snapshot(self) -> Snapshot:
        if not self._watching:
            self.refresh()
        with self._lock:
            return self._snapshot

    @property
    def program(self) -> Program:
        with self._lock:
            return self._snapshot.program

    def next_delay(self, failures: int) -> float:
        """Seconds until the next poll: the interval, or exponential backoff after faults."""
        backoff = min(self.max_backoff, min(5.0, self.interval) * 2 ** max(0, failures - 1))
        base = self.interval if failures == 0 else backoff
        return max(0.05, base * (1 + random.uniform(-self.jitter, self.jitter)))

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        stop = threading.Event()
        self._watching = True

        def loop() -> None:
            failures = 0
            while not stop.is_set():
                try:
                    changed = self.refresh()
                except Exception:  # a bug must not end polling silently
                    log.exception("NetBird poll failed unexpectedly; last good state stays")
                    changed = False
                    self.errors["internal"] += 1
                    self.last_error = FetchError("internal", "unexpected error")
                failures = 0 if self.last_error is None else failures + 1
                if changed:
                    on_change()
                stop.wait(self.next_delay(failures))

        t = threading.Thread(target=loop, name="netbird-poll", daemon=True)
        t.start()

        def stop_watch() -> None:
            stop.set()
            t.join(timeout=5)
            self._watching = False

        return stop_watch


def make_pipeline(
    url: str = DEFAULT_URL,
    token_file: str | None = None,
    ca_file: str | None = None,
    **kwargs: Any,
) -> NetbirdPipeline:
    """Everything the CLI needs in one call; raises TokenError / ValueError on bad config."""
    client = NetbirdClient(url, load_token(token_file), ca_file=ca_file)
    return NetbirdPipeline(NetbirdSource(client), **kwargs)

