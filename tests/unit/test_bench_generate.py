"""The benchmark's cluster generator: deterministic for a seed, and every object it makes
is valid (admission accepts it and the semantics compile it). No timing here."""

from __future__ import annotations

import json

from tests.kit.builders import snapshot_of
from tests.kit.generate import LOCAL_NODE, datapath_manifests, generate, peer_block_addresses


def test_same_seed_same_cluster_other_seed_other_cluster() -> None:
    a, b, c = generate(600, 60, seed=7), generate(600, 60, seed=7), generate(600, 60, seed=8)
    assert json.dumps(a.objects(), sort_keys=True) == json.dumps(b.objects(), sort_keys=True)
    assert json.dumps(a.objects(), sort_keys=True) != json.dumps(c.objects(), sort_keys=True)
    # incremental events are seeded too
    assert a.relabel_pod(a.pod_objs[3]) == b.relabel_pod(b.pod_objs[3])
    assert a.new_pod() == b.new_pod()


def test_objects_are_valid_and_the_mix_is_there() -> None:
    cl = generate(1000, 100, seed=1)
    assert len(cl.pod_objs) == 1000 and len(cl.policy_objs) == 100
    assert len(cl.local_pods) == 100  # 10 % on the local node
    snap = snapshot_of(cl.objects(), LOCAL_NODE)
    inv, program = snap.inventory, snap.program
    assert inv.problems == []
    assert len(inv.endpoints) == 1000 and len(inv.policies) == 100
    assert len(program.endpoints) == 100
    specs = json.dumps([p["spec"] for p in cl.policy_objs])
    for feature in ('"namespaceSelector"', '"except"', '"endPort"', '"port": "http"', '"matchExpressions"',
                    '"Egress"', '"ipBlock"'):
        assert feature in specs, feature
    ips = [ip for ep in inv.endpoints.values() for ip in ep.ips]
    assert {ip.version for ip in ips} == {4, 6}
    assert len(set(ips)) == len(ips)
    # every namespace has its default deny, and isolation reaches the local pods
    assert all(ep.ingress.isolated for ep in program.endpoints.values())
    # mutations stay valid
    for body in (cl.new_pod(), cl.relabel_pod(cl.pod_objs[0]), cl.change_policy(cl.policy_objs[5]),
                 cl.relabel_namespace(cl.namespaces[3])):
        inv2 = snapshot_of([*cl.objects(), body], LOCAL_NODE).inventory
        assert inv2.problems == []


def test_local_pods_are_capped() -> None:
    assert len(generate(5000, 10, seed=2).local_pods) == 250


def test_datapath_peer_blocks_do_not_collapse() -> None:
    blocks = peer_block_addresses(1000)
    assert len(set(blocks)) == 1000
    snap = snapshot_of(datapath_manifests(1000), LOCAL_NODE)
    inv, program = snap.inventory, snap.program
    assert inv.problems == []
    server = program.endpoints["bench/server"]
    (rule,) = server.ingress.rules
    assert rule.peers is not None and len(rule.peers) == 1001  # the client + 1,000 /32s
