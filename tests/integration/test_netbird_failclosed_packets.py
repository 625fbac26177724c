"""NetBird fail-closed with real packets on both dataplanes (issue 16): an invalid drop
rule still blocks what an accept would allow, several port ranges (overlapping) compile
and are enforced, and a drop kept as last good survives a restart with the API down.

Uses the NetBird lab of tests/integration/test_netbird_packets.py (peers alice, bob and
carol reaching the node's local peer through a TUN relay; the fake management API).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.kit import netbird_env
from tests.kit.netbird_env import INBOUND, F, Flow, NbEnv, _group, _rule
from tests.kit.netbird_env import diff_flows as _diff
from tests.kit.netbird_lab import LOCAL, wait_for

env = netbird_env.env  # the fixture of the NetBird packet tests


@pytest.fixture
def nbenv(env: NbEnv) -> NbEnv:  # the lab, overlay and API of the NetBird packet tests
    return env


def _policy(name: str, rule: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"pol-{name}", "name": name, "description": "", "enabled": True,
            "source_posture_checks": None, "rules": [rule]}


def _block_bob(nbenv: NbEnv) -> dict[str, Any]:
    (pol,) = [p for p in nbenv.api.data["policies"] if p["name"] == "block-bob"]
    return pol["rules"][0]


def test_invalid_drop_and_several_port_ranges_fail_closed(nbenv: NbEnv) -> None:
    # block-bob (drop bob -> local tcp/80, beating "web") arrives broken: unknown protocol
    # and bidirectional null. It must block every protocol, both ways.
    _block_bob(nbenv).update(protocol="gre", bidirectional=None)
    clients = _group("gClients", "web-clients", ["alice", "bob"])
    servers = _group("gServers", "servers", [LOCAL])
    backup = _group("gBackup", "backup", ["carol"])
    web2 = _rule("web2", "accept", "tcp", clients, servers)
    web2.update(ports=None, port_ranges=[{"start": 81, "end": 81}, {"start": 85, "end": 90}])
    no_sync = _rule("no-sync", "drop", "udp", backup, servers)
    no_sync.update(ports=None, port_ranges=[{"start": 81, "end": 81}, {"start": 70, "end": 90}])  # overlapping
    nbenv.api.data["policies"] += [_policy("web2", web2), _policy("no-sync", no_sync)]
    want = {
        F("alice", LOCAL, "tcp", 80): "allow",  # web
        F("alice", LOCAL, "tcp", 81): "allow",  # web2, first of two ranges
        F("alice", LOCAL, "icmp"): "allow",  # ping
        F("bob", LOCAL, "tcp", 80): "deny",  # the broken drop: every protocol...
        F("bob", LOCAL, "tcp", 81): "deny",
        F("bob", LOCAL, "icmp"): "deny",
        F("bob", LOCAL, "tcp", 80, 6): "deny",
        F(LOCAL, "bob", "tcp", 81): "deny",  # ...both ways (admin would allow it)
        F(LOCAL, "alice", "tcp", 81): "allow",  # admin
        F("carol", LOCAL, "udp", 81): "deny",  # no-sync's ranges beat sync
        F("carol", LOCAL, "icmp"): "allow",
        F(LOCAL, "carol", "udp", 81): "allow",  # no-sync is one-way
    }
    flows = list(want)
    assert not _diff(nbenv.explain(flows), want), "explain disagrees"
    nbenv.start_agent()
    nbenv.wait_ready()
    assert not _diff(nbenv.probe(flows), want), nbenv.agent_log()


def test_drop_kept_as_last_good_survives_a_restart_with_the_api_down(nbenv: NbEnv) -> None:
    bob_web = F("bob", LOCAL, "tcp", 80)
    nbenv.start_agent()
    nbenv.wait_ready()
    assert nbenv.probe([bob_web])[bob_web] == "deny"
    # The drop is edited into an invalid accept (no drop left in it): its last good
    # version stays. Then carol joins web-clients: a change that shows the agent polled.
    _block_bob(nbenv).update(action="accept", ports=["http"])
    nbenv.api.data["groups"][1]["peers"].append({"id": "pC", "name": "carol"})
    carol_web = F("carol", LOCAL, "tcp", 80)
    assert wait_for(lambda: nbenv.probe([carol_web])[carol_web] == "allow", timeout=30), nbenv.agent_log()
    want: dict[Flow, str] = {**INBOUND, bob_web: "deny", carol_web: "allow"}
    assert not _diff(nbenv.probe(list(want)), want), nbenv.agent_log()

    # Restart with the API down: the saved admitted state, the drop included.
    assert nbenv.agent is not None
    nbenv.agent.terminate()
    nbenv.agent.wait(timeout=20)
    nbenv.api.fault = "500"
    nbenv.start_agent()
    nbenv.wait_ready()
    assert not _diff(nbenv.probe(list(want)), want), nbenv.agent_log()
    # The API answers again with the same invalid policy: still the last good drop.
    n = len(nbenv.api.requests)
    nbenv.api.fault = None
    assert wait_for(lambda: len(nbenv.api.requests) >= n + 6, timeout=30)  # two more polls
    assert not _diff(nbenv.probe(list(want)), want), nbenv.agent_log()
