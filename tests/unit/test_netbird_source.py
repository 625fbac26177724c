"""The NetBird source against a management-API server started by the test (no root needed).

The server serves the seed's response shapes (groups as objects, string ports, null
lists, a multi-rule policy whose later rule has `sources: null`), checks tokens, and can
be told to fail: 5xx, garbage bodies, slow answers, a token that sees only part of the
peers. The source must keep the last good state and count each cause.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import Daemon
from agent.ir import Program, Verdict
from agent.pipeline import NetbirdPipeline
from agent.simulate import evaluate
from agent.sources import netbird as src
from agent.sources.netbird import NetbirdClient, NetbirdSource, TokenError, load_token
from tests.kit import until
from tests.kit.netbird_api import LOCAL, RESTRICTED, TOKEN, A, B, ManagementApi, serve
from tests.kit.recording import RecordingDataplane


@pytest.fixture
def api() -> Iterator[tuple[ManagementApi, str]]:
    state = ManagementApi()
    with serve(state) as url:
        yield state, url


def addresses(interface: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    assert interface == "wt0"
    return [ipaddress.ip_address(LOCAL), ipaddress.ip_address("fe80::1")]


def pipeline(url: str, token: str = TOKEN, **kw: Any) -> NetbirdPipeline:
    client = NetbirdClient(url, token, timeout=kw.pop("timeout", 0.3))
    kw.setdefault("address_lookup", addresses)
    return NetbirdPipeline(NetbirdSource(client), **kw)


def verdict(program: Program, s: str, d: str, proto: str = "tcp", port: int | None = 80) -> str:
    fv = evaluate(program, ipaddress.ip_address(s), ipaddress.ip_address(d), proto, port)
    return "allow" if fv.verdict is Verdict.ACCEPT else "deny"


def is_bootstrap(program: Program) -> bool:
    return all(k.startswith("netbird-bootstrap:") for k in program.endpoints)


# ---------------------------------------------------------------- happy path


def test_sync_from_the_seed_shapes(api):
    state, url = api
    pipe = pipeline(url)
    snap = pipe.snapshot()
    assert pipe.ready.is_set() and not pipe.errors
    assert list(snap.program.endpoints) == ["local"]
    ep = snap.program.endpoints["local"]
    assert ep.interface == "wt0"
    assert [str(i) for i in ep.ips] == [LOCAL, "fd00:4e42::1"]
    p = snap.program
    # Seed policy: devs <-> devs tcp/80 (ranges ignored), sources must run >= 0.70.0.
    assert verdict(p, A, LOCAL, "tcp", 80) == "allow"
    assert verdict(p, LOCAL, A, "tcp", 80) == "allow"
    assert verdict(p, A, LOCAL, "tcp", 81) == "deny"
    assert verdict(p, B, LOCAL, "tcp", 80) == "deny"  # bob is not a dev
    # icmp from All to devs: bob may ping; the `sources: null` ssh rule opens nothing.
    assert verdict(p, B, LOCAL, "icmp", None) == "allow"
    assert verdict(p, A, LOCAL, "tcp", 22) == "deny"
    assert verdict(p, LOCAL, "1.1.1.1", "tcp", 443) == "allow"  # outside the NetBird range
    assert verdict(p, LOCAL, B, "tcp", 80) == "deny"
    warnings = snap.inventory.context["netbird.warnings"]
    assert [(w.ref.name, w.field) for w in warnings] == [
        ("ch8i4ug6lnn4g9hqv7mg", "rules[0].port_ranges"),
        ("multi", "rules[1].sources"),
    ]
    assert "/api/posture-checks" in state.requests
    # Peers become endpoints for explain.
    assert {e.name for e in snap.inventory.endpoints.values()} == {"local", "alice", "bob"}


def test_posture_checks_fetched_only_when_referenced(api):
    state, url = api
    for pol in state.data["policies"]:
        pol["source_posture_checks"] = [] if pol["source_posture_checks"] else None
    pipeline(url).snapshot()
    assert "/api/posture-checks" not in state.requests
    assert {"/api/policies", "/api/groups", "/api/peers"} <= set(state.requests)


def test_local_peer_by_id_and_missing_local_peer(api):
    _, url = api
    pipe = pipeline(url, peer_id="pA", address_lookup=lambda _: [])
    assert list(pipe.snapshot().program.endpoints) == ["alice"]
    pipe = pipeline(url, peer_id="nope")
    assert is_bootstrap(pipe.snapshot().program)
    assert pipe.errors == {"local_peer": 1}
    pipe = pipeline(url, address_lookup=lambda _: [ipaddress.ip_address("100.64.9.9")])
    assert is_bootstrap(pipe.snapshot().program)
    assert pipe.errors == {"local_peer": 1}


# ---------------------------------------------------------------- faults


FAULTS = [  # (server fault, paths, cause)
    ("500", (), "server"),
    ("500", ("peers",), "server"),
    ("garbage", (), "malformed"),
    ("garbage", ("posture-checks",), "malformed"),
    ("notlist", ("groups",), "malformed"),
    ("slow", ("policies",), "timeout"),
    ("forbidden", (), "auth"),
    ("redirect", (), "http"),
]


@pytest.mark.parametrize(("fault", "paths", "cause"), FAULTS)
def test_fault_keeps_last_good_state_and_counts_it(api, caplog, fault, paths, cause):
    state, url = api
    pipe = pipeline(url)
    good = pipe.snapshot().program
    assert not is_bootstrap(good)
    state.fault, state.fault_paths = fault, paths
    # Something changed upstream too: it must not leak into what is enforced.
    state.data["groups"][1]["peers"].append({"id": "pB", "name": "bob"})
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            assert pipe.snapshot().program == good
    assert pipe.errors == {cause: 3}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, "one log line per cause, not one per poll"
    assert f"({cause})" in errors[0].getMessage()
    # Recovery takes the new state.
    state.fault = None
    assert verdict(pipe.snapshot().program, B, LOCAL, "tcp", 80) == "allow"
    assert pipe.last_error is None


def test_a_second_cause_is_logged_and_counted_separately(api, caplog):
    state, url = api
    pipe = pipeline(url)
    pipe.snapshot()
    with caplog.at_level(logging.INFO):
        state.fault = "500"
        pipe.refresh()
        state.fault = "garbage"
        pipe.refresh()
        pipe.refresh()
        state.fault = None
        pipe.refresh()
    assert pipe.errors == {"server": 1, "malformed": 2}
    msgs = [r.getMessage() for r in caplog.records if r.name == "agent.sources.netbird"]
    assert sum("(server)" in m for m in msgs) == 1
    assert sum("(malformed)" in m for m in msgs) == 1
    assert any("answers again" in m for m in msgs)


def test_restricted_token_is_a_partial_view_and_never_enforced(api):
    _, url = api
    pipe = pipeline(url, token=RESTRICTED)
    assert is_bootstrap(pipe.snapshot().program)
    assert pipe.errors == {"partial": 1}
    assert not pipe.ready.is_set()


def test_partial_view_after_a_good_sync_keeps_the_good_state(api):
    state, url = api
    pipe = pipeline(url)
    good = pipe.snapshot().program
    state.data["groups"][0]["peers"].append({"id": "pX", "name": "hidden"})  # All names an unseen peer
    assert pipe.snapshot().program == good
    assert pipe.errors == {"partial": 1}


def test_wrong_token_unreachable_server_and_bootstrap(api):
    _, url = api
    pipe = pipeline(url, token="nbp_wrong")
    assert is_bootstrap(pipe.snapshot().program)
    assert pipe.errors == {"auth": 1}
    pipe = pipeline("http://127.0.0.1:9")  # nothing listens on discard
    assert is_bootstrap(pipe.snapshot().program)
    assert pipe.errors == {"connection": 1}


def test_invalid_object_keeps_its_last_good_version(api):
    state, url = api
    pipe = pipeline(url)
    pipe.snapshot()
    state.data["policies"][0]["rules"][0]["protocol"] = "gre"
    state.data["peers"][1]["ip"] = "not-an-ip"
    snap = pipe.snapshot()
    assert sorted((p.ref.kind, p.ref.name, p.field) for p in snap.problems) == [
        ("Peer", "pA", "ip"), ("Policy", "ch8i4ug6lnn4g9hqv7mg", "rules[0].protocol")]
    assert verdict(snap.program, A, LOCAL, "tcp", 80) == "allow"  # both last good versions in force
    assert not pipe.errors  # the poll itself succeeded


def test_the_token_never_appears_in_logs_or_errors(api, caplog, tmp_path):
    state, url = api
    with caplog.at_level(logging.DEBUG):
        pipe = pipeline(url)
        pipe.snapshot()
        for fault, paths, _ in FAULTS:
            state.fault, state.fault_paths = fault, paths
            pipe.refresh()
        pipeline("http://127.0.0.1:9").refresh()
        pipeline(url, token=RESTRICTED).refresh()
    text = caplog.text + repr(pipe.source.client) + str(pipe.last_error)
    assert "nbp_" not in text
    assert len(caplog.records) > 5
    # A token with a newline would make the HTTP library quote it in its error: refused first.
    f = tmp_path / "token"
    f.write_text("nbp_secret\nmore\n")
    f.chmod(0o600)
    with pytest.raises(TokenError) as e:
        load_token(f)
    assert "secret" not in str(e.value)


# ---------------------------------------------------------------- token, TLS, URL


def test_token_file_permissions_and_env(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o644)
    with pytest.raises(TokenError, match="group or others") as e:
        load_token(f)
    assert TOKEN not in str(e.value)
    f.chmod(0o640)
    with pytest.raises(TokenError):
        load_token(f)
    f.chmod(0o600)
    assert load_token(f) == TOKEN
    assert load_token(None, env={"NETBIRD_TOKEN": TOKEN}) == TOKEN
    with pytest.raises(TokenError, match="NETBIRD_TOKEN"):
        load_token(None, env={})
    with pytest.raises(TokenError, match="cannot read"):
        load_token(tmp_path / "missing")


def test_url_checks():
    with pytest.raises(ValueError, match="clear"):
        NetbirdClient("http://api.example.com", TOKEN)
    with pytest.raises(ValueError, match="CA file"):
        NetbirdClient("https://api.example.com", TOKEN, ca_file="/nonexistent/ca.pem")
    c = NetbirdClient("https://api.netbird.io/", TOKEN)
    assert c.location("peers") == "https://api.netbird.io/api/peers"
    assert c.session.verify is True


# ---------------------------------------------------------------- watch, daemon, state file


def test_watch_polls_and_calls_back_on_change_only(api):
    state, url = api
    pipe = pipeline(url, interval=0.05, jitter=0.0)
    changes = threading.Event()
    count = []

    def on_change() -> None:
        count.append(1)
        changes.set()

    stop = pipe.watch(on_change)
    try:
        assert changes.wait(5)  # the first good state
        changes.clear()
        time.sleep(0.3)
        assert not changes.is_set()  # nothing changed: no callback
        state.data["groups"][1]["peers"].append({"id": "pB", "name": "bob"})
        assert changes.wait(5)
        assert verdict(pipe.snapshot().program, B, LOCAL, "tcp", 80) == "allow"
    finally:
        stop()
    assert len(count) == 2


def test_backoff_grows_on_faults_and_has_jitter(api):
    _, url = api
    pipe = pipeline(url, interval=30.0, jitter=0.1, max_backoff=120.0)
    assert 27 <= pipe.next_delay(0) <= 33
    delays = [pipe.next_delay(n) for n in range(1, 9)]
    assert delays[0] < 6 and delays[1] > delays[0] and max(delays) <= 132
    assert pipe.next_delay(8) >= 108


def test_daemon_drives_the_pipeline_bootstrap_first(api):
    state, url = api
    state.fault = "500"
    pipe = pipeline(url, interval=0.05, jitter=0.0, max_backoff=0.1)
    dp = RecordingDataplane()
    daemon = Daemon(pipe, dp, debounce=0.01, resync=60)
    t = threading.Thread(target=daemon.run, daemon=True)
    t.start()
    try:
        until(lambda: dp.programs, 5, 0.02)
        assert dp.programs and is_bootstrap(dp.programs[0])
        assert not pipe.ready.is_set()
        # The bootstrap program may be applied before the first poll: let one fail first.
        assert until(lambda: pipe.errors["server"] >= 1, timeout=10)
        state.fault = None
        assert pipe.ready.wait(5)
        until(lambda: not is_bootstrap(dp.programs[-1]), 5, 0.02)
        assert list(dp.programs[-1].endpoints) == ["local"]
        assert pipe.errors["server"] >= 1
    finally:
        daemon.stop()
        t.join(5)


def test_state_file_survives_a_restart_with_the_api_down(api, tmp_path):
    state, url = api
    path = tmp_path / "state" / "netbird.json"
    good = pipeline(url, state_file=path).snapshot().program
    assert path.exists() and (os.stat(path).st_mode & 0o077) == 0
    assert TOKEN not in path.read_text()
    state.fault = "500"
    # The interface may be down too while NetBird restarts: the saved local peer is used.
    pipe = pipeline(url, state_file=path, address_lookup=_down)
    assert pipe.ready.is_set()
    assert pipe.snapshot().program == good
    assert pipe.errors == {"server": 1}
    Path(path).write_text("{not json")
    assert is_bootstrap(pipeline(url, state_file=path).program)


def _down(interface: str) -> list[Any]:
    raise src.FetchError("local_peer", f"{interface} is down")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_is_verified_and_a_ca_file_can_be_given(tmp_path, caplog):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    state = ManagementApi()
    with serve(state, (cert, key)) as url:
        pipe = NetbirdPipeline(NetbirdSource(NetbirdClient(url, TOKEN, timeout=2)), address_lookup=addresses)
        with caplog.at_level(logging.DEBUG):
            assert is_bootstrap(pipe.snapshot().program)
        assert pipe.errors == {"tls": 1}
        assert "nbp_" not in caplog.text
        pipe = NetbirdPipeline(NetbirdSource(NetbirdClient(url, TOKEN, ca_file=str(cert), timeout=2)),
                               address_lookup=addresses)
        assert list(pipe.snapshot().program.endpoints) == ["local"]
        assert not pipe.errors


# ---------------------------------------------------------------- fail closed (issue 16)

ALL_GROUP = {"id": "ch8i4ug6lnn4g9hqv7a1", "name": "All"}
DEVS_GROUP = {"id": "ch8i4ug6lnn4g9hqv7m0", "name": "devs"}


def nb_policy(pid: str, action: str, **rule_kw: Any) -> dict[str, Any]:
    """A one-rule policy from All to devs, both ways, in the API's response shape."""
    r = {"id": pid, "name": f"{pid}-rule", "description": "", "enabled": True, "action": action,
         "bidirectional": True, "protocol": "all", "ports": None, "port_ranges": None,
         "sources": [ALL_GROUP], "destinations": [DEVS_GROUP]}
    r.update(rule_kw)
    return {"id": pid, "name": pid, "description": "", "enabled": True, "source_posture_checks": None,
            "rules": [r]}


def with_allow_all(state: ManagementApi, *extra: dict[str, Any]) -> None:
    state.data["policies"] = [nb_policy("allow-all", "accept"), *extra]


FLOWS = [(A, LOCAL, "tcp", 22), (A, LOCAL, "tcp", 80), (LOCAL, A, "tcp", 22), (B, LOCAL, "udp", 53),
         (B, LOCAL, "icmp", None), (LOCAL, B, "tcp", 8080)]


def verdicts(program: Program) -> list[str]:
    return [verdict(program, *f) for f in FLOWS]


def test_several_port_ranges_no_longer_fail_the_account(api):
    # Two or more port_ranges raised TypeError while compiling: no policy of the account
    # was enforced or updated any more.
    state, url = api
    ranges = [{"start": 8000, "end": 8100}, {"start": 8050, "end": 8200}, {"start": 21, "end": 22}]
    with_allow_all(state, nb_policy("block", "drop", protocol="tcp", port_ranges=ranges))
    pipe = pipeline(url)
    p = pipe.snapshot().program
    assert not pipe.errors and not is_bootstrap(p)
    assert [verdict(p, A, LOCAL, "tcp", port) for port in (20, 21, 22, 7999, 8000, 8150, 8200, 8201)] == \
        ["allow", "deny", "deny", "allow", "deny", "deny", "deny", "allow"]


def test_invalid_drop_without_last_good_fails_closed(api):
    state, url = api
    with_allow_all(state, nb_policy("block-ssh", "drop", protocol="gre", ports=["22"], bidirectional=None))
    pipe = pipeline(url)
    snap = pipe.snapshot()
    # Unknown protocol: every protocol; bidirectional null: both ways.
    assert verdicts(snap.program) == ["deny", "deny", "deny", "deny", "deny", "deny"]
    assert sorted((p.ref.name, p.field) for p in snap.problems) == [
        ("block-ssh", "rules[0].bidirectional"), ("block-ssh", "rules[0].protocol")]
    assert all("'block-ssh-rule'" in p.message for p in snap.problems)
    assert not pipe.errors


def test_invalid_drop_keeps_its_last_good_version_and_adds_its_own_drops(api):
    state, url = api
    with_allow_all(state, nb_policy("block-ssh", "drop", protocol="tcp", ports=["22"]))
    pipe = pipeline(url)
    assert verdicts(pipe.snapshot().program) == ["deny", "allow", "deny", "allow", "allow", "allow"]
    # Now the operator's edit arrives broken: ports ["0"]. The last good drop (tcp/22)
    # stays, and the broken drop applies to every tcp port.
    state.data["policies"][1]["rules"][0]["ports"] = ["22", "0"]
    snap = pipe.snapshot()
    assert [(p.ref.name, p.field) for p in snap.problems] == [("block-ssh", "rules[0].ports[1]")]
    assert verdicts(snap.program) == ["deny", "deny", "deny", "allow", "allow", "deny"]
    # An invalid version that has no drop at all: only the last good version is in force.
    state.data["policies"][1]["rules"][0].update(action="accept", ports=["ssh"])
    assert verdicts(pipe.snapshot().program) == ["deny", "allow", "deny", "allow", "allow", "allow"]


def test_restart_from_the_state_file_enforces_the_admitted_state(api, tmp_path):
    state, url = api
    path = tmp_path / "state" / "netbird.json"
    with_allow_all(state, nb_policy("block-ssh", "drop", protocol="tcp", ports=["22"]))
    pipe = pipeline(url, state_file=path)
    pipe.snapshot()
    # The drop is edited into an invalid accept: the last good drop stays in force.
    state.data["policies"][1]["rules"][0].update(action="accept", ports=["ssh"])
    before = pipe.snapshot().program
    assert verdicts(before) == ["deny", "allow", "deny", "allow", "allow", "allow"]
    # Restart with the API down: the saved state gives exactly the same program (the old
    # state file held the raw answer only, so the drop kept as last good was gone).
    state.fault = "500"
    down = pipeline(url, state_file=path)
    assert down.ready.is_set()
    assert down.snapshot().program == before
    # The API answers again with the same invalid policy: the last good version survived
    # the restart in the saved store too.
    state.fault = None
    assert down.snapshot().program == before and down.last_error is None
    assert [(p.ref.name, p.field) for p in down.snapshot().problems] == [("block-ssh", "rules[0].ports[0]")]
    # explain/matrix read the same state read-only: same verdicts, the file untouched.
    saved = path.read_bytes()
    state.data["policies"][1]["rules"][0]["ports"] = ["http"]
    ro = pipeline(url, state_file=path, readonly=True)
    assert verdicts(ro.snapshot().program) == verdicts(before)
    assert path.read_bytes() == saved


def test_policies_without_an_id_or_with_a_duplicate_id_keep_their_drops(api):
    state, url = api
    anonymous = nb_policy("x", "drop", protocol="tcp", ports=["22"])
    del anonymous["id"]
    dup_accept = nb_policy("allow-all", "accept")  # a second copy of the accept's id
    dup_drop = nb_policy("allow-all", "drop", protocol="udp")
    with_allow_all(state, anonymous, dup_accept, dup_drop)
    pipe = pipeline(url)
    snap = pipe.snapshot()
    problems = sorted((p.ref.name, p.field) for p in snap.problems)
    assert problems == [("[1]", "id"), ("allow-all", "id"), ("allow-all", "id")]
    # The accept's id is duplicated: every copy keeps only its drops, so nothing opens.
    assert verdicts(snap.program) == ["deny"] * 6
    state.data["policies"] = [nb_policy("allow-all", "accept"), anonymous, dup_drop | {"id": "block-udp"}]
    p = pipe.snapshot().program
    assert verdicts(p) == ["deny", "allow", "deny", "deny", "allow", "allow"]
