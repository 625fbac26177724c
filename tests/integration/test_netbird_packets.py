"""NetBird peer mode with real packets on a simulated wt0 (tests/kit/netbird_lab.py).

The local peer is the lab's node namespace; alice, bob and carol are peer namespaces
reaching it through the TUN relay. The management-API test server (tests/kit/netbird_api.py)
listens on 127.0.0.1 inside the node namespace, where `stockade run --source netbird`
polls it. Every flow is probed in both directions and must match both the expected
table below and `stockade explain --source netbird --output json`.
"""

from __future__ import annotations

from tests.kit import netbird_env
from tests.kit.netbird_env import INBOUND, OUTBOUND, F, NbEnv, diff_flows
from tests.kit.netbird_lab import LOCAL, wait_for

env = netbird_env.env  # the fixture


def test_netbird_policies_enforced_on_wt0_both_directions(env: NbEnv) -> None:
    netbird_env.netbird_policies_enforced_on_wt0_both_directions(env)


def test_before_the_first_sync_inbound_is_denied_except_replies(env: NbEnv) -> None:
    env.api.fault = "500"
    env.start_agent()
    # The bootstrap program is in the kernel (a sync happened) but the agent is not ready.
    assert wait_for(lambda: env.get("/healthz")[0] == 200 and env.metric("stockade_syncs_total", result="success") >= 1,
                    timeout=30), env.agent_log()
    assert env.get("/readyz")[0] == 503
    env.alive()
    inbound = [F("alice", LOCAL, "tcp", 80), F("alice", LOCAL, "icmp"), F("carol", LOCAL, "udp", 81),
               F("bob", LOCAL, "tcp", 81, 6)]
    # Outbound is untouched before the first sync; its replies come back in on wt0 and pass.
    outbound = [F(LOCAL, "alice", "tcp", 80), F(LOCAL, "alice", "icmp"), F(LOCAL, "carol", "udp", 81),
                F(LOCAL, "bob", "tcp", 80, 6)]
    got = env.probe(inbound + outbound)
    assert not diff_flows(got, {**dict.fromkeys(inbound, "deny"), **dict.fromkeys(outbound, "allow")}), (
        "before the first sync the bootstrap program (an endpoint keyed by wt0 alone, no addresses"
        " yet) must deny new inbound flows on wt0 and pass outbound flows and their replies")
    assert env.metric("stockade_source_errors_total", cause="server") >= 1

    env.api.fault = None
    env.wait_ready()
    want = {**INBOUND, **OUTBOUND}
    assert not diff_flows(env.probe(list(want)), want), env.agent_log()


def test_inbound_only_leaves_outbound_open(env: NbEnv) -> None:
    outbound = dict.fromkeys(OUTBOUND, "allow")
    want = {**INBOUND, **outbound}
    assert not diff_flows(env.explain(list(want), inbound_only=True), want)
    env.start_agent(inbound_only=True)
    env.wait_ready()
    assert not diff_flows(env.probe(list(want)), want), env.agent_log()
