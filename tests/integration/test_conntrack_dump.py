"""Strict mode's conntrack read (agent.dataplane.conntrack.established), by its own
ctnetlink dump, in the lab's node namespace (conntrack switched on there by a `ct state`
rule): the IPv4 flows pyroute2's decoder reads, and the IPv6 ones it left out (its dump
asks for IPv4 only, so strict mode never re-judged an IPv6 flow)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.kit import ROOT, Lab

SCRIPT = r"""
import json, socket, sys
from agent.dataplane import conntrack
from pyroute2 import Conntrack

held = []
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.bind((host, 0)); srv.listen(8)
    for _ in range(3):
        c = socket.create_connection((host, srv.getsockname()[1]))
        held += [c, srv.accept()[0]]
    held.append(srv)
    u = socket.socket(fam, socket.SOCK_DGRAM)
    for port in (9001, 9002):
        u.sendto(b"x", (host, port))
    held.append(u)

def key(f):
    return [f.protocol, str(f.src), str(f.dst), f.sport, f.dport]

ours = sorted(key(f) for f in conntrack._dump())
with Conntrack() as ct:
    theirs = sorted([conntrack.REJUDGED[e.tuple_orig.proto], e.tuple_orig.saddr, e.tuple_orig.daddr,
                     e.tuple_orig.sport, e.tuple_orig.dport]
                    for e in ct.dump_entries() if e.tuple_orig.proto in conntrack.REJUDGED)
print(json.dumps({"ours": ours, "theirs": theirs,
                  "public": sorted(key(f) for f in conntrack.established())}))
"""


def test_dump_reads_what_pyroute2_reads(lab: Lab) -> None:
    lab.node_sh("nft", "add table inet ctdump; add chain inet ctdump out { type filter hook output priority 0; }; "
                       "add rule inet ctdump out ct state new counter")
    res = subprocess.run(["ip", "netns", "exec", lab.node, sys.executable, "-c", SCRIPT],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["ours"] == got["public"]
    assert [f for f in got["ours"] if ":" not in f[1]] == got["theirs"]
    v6 = [(p, dport) for p, src, _, _, dport in got["ours"] if ":" in src]
    assert sorted(p for p, _ in v6) == ["tcp"] * 3 + ["udp"] * 2  # 3 connections, 2 datagram flows
    assert {d for p, d in v6 if p == "udp"} == {9001, 9002}
