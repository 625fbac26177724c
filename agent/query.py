"""Questions asked of a snapshot, answered as data: resolve, explain, matrix, counters.

`stockade explain|matrix|counters` print these answers; tests and bench call them
directly. Also the one place a dataplane is built by name (`make_dataplane`). Nothing
here prints or parses arguments: that is cli.py.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from agent.dataplane.base import Dataplane
from agent.inventory import Endpoint, Inventory, IPAddress
from agent.ir import Rule, Verdict
from agent.metrics import counter_rows
from agent.pipeline import Snapshot
from agent.simulate import Decision, FlowVerdict, evaluate, index_by_ip

DATAPLANES = ("nftables", "ebpf")


class QueryError(ValueError):
    """The question cannot be answered as asked (unknown pod, missing port, ...)."""


# ------------------------------------------------------------------ dataplanes


@dataclass(frozen=True)
class DataplaneOptions:
    """How to build a dataplane; the defaults are a deployed agent's."""

    audit: bool = False  # program everything, drop nothing, count would-be drops
    guard_unknown: bool = False  # --unknown-endpoints=deny: nftables only
    ebpf_sizes: Any = None  # agent.dataplane.ebpf.Sizes (None: the defaults)
    pin_root: str | None = None  # eBPF pin directory (None: $STOCKADE_BPF_PIN_ROOT, then the default)


def make_dataplane(name: str, options: DataplaneOptions | None = None) -> Dataplane:
    """The dataplane called `name`; imported on demand (bcc is loaded only for ebpf)."""
    opts = options or DataplaneOptions()
    if name == "nftables":
        from agent.dataplane.nftables import NftablesDataplane, Options

        return NftablesDataplane(Options(audit=opts.audit))
    if name == "ebpf":
        if opts.guard_unknown:
            raise QueryError("--unknown-endpoints=deny needs the nftables dataplane")
        from agent.dataplane.ebpf import EbpfDataplane

        return EbpfDataplane(opts.ebpf_sizes, pin_root=opts.pin_root, audit=opts.audit)
    raise QueryError(f"unknown dataplane {name!r} (available: {', '.join(DATAPLANES)})")


# ------------------------------------------------------------------ addresses and ports


def resolve(inv: Inventory, text: str) -> tuple[IPAddress, Endpoint | None]:
    """An address or a `namespace/pod` key -> (address, the endpoint holding it if any)."""
    try:
        ip = ipaddress.ip_address(text)
        return ip, inv.endpoint_by_ip(ip)
    except ValueError:
        ep = inv.endpoints.get(text)
        if ep is None:
            raise QueryError(f"no pod {text!r} with an IP in the source") from None
        return ep.ips[0], ep


def pick(ep: Endpoint, version: int | None) -> IPAddress | None:
    """The endpoint's first address of IP `version` (None: its primary address)."""
    for ip in ep.ips:
        if version is None or ip.version == version:
            return ip
    return None


def port_on(ep: Endpoint | None, port: str, protocol: str) -> int | None:
    """A port number, or a named port looked up on `ep` (None: no such name)."""
    if port.isdigit():
        return int(port)
    return ep.named_port(port, protocol) if ep else None


# ------------------------------------------------------------------ explain


@dataclass(frozen=True)
class Explanation:
    """The verdict for one flow and the decisions of both sides."""

    src: IPAddress
    src_endpoint: Endpoint | None
    dst: IPAddress
    dst_endpoint: Endpoint | None
    protocol: str  # upper-case, as asked
    port: int | None  # None for ICMP
    flow: FlowVerdict

    @property
    def allowed(self) -> bool:
        return self.flow.verdict is Verdict.ACCEPT

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": "allow" if self.allowed else "deny",
            "from": {"ip": str(self.src), "endpoint": self.src_endpoint.key if self.src_endpoint else None},
            "to": {"ip": str(self.dst), "endpoint": self.dst_endpoint.key if self.dst_endpoint else None},
            "protocol": self.protocol,
            "port": self.port,
            "egress": decision_json(self.flow.egress),
            "ingress": decision_json(self.flow.ingress),
        }


def decision_json(d: Decision | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {
        "endpoint": d.endpoint,
        "verdict": "allow" if d.verdict is Verdict.ACCEPT else "deny",
        "isolated_by": list(d.isolated_by),
        "rule": None if d.rule is None else rule_json(d.rule),
        "passed": [rule_json(r) for r in d.passed],
        "reason": d.reason,
    }


def rule_json(r: Rule) -> dict[str, Any]:
    o = r.origin
    return {
        "policy": f"{o.namespace}/{o.policy}".lstrip("/"),
        "kind": o.kind or None,
        "tier": o.tier.value,
        "priority": o.priority,
        "direction": o.direction.value,
        "index": o.index,
        "name": o.name or None,
        "verdict": r.verdict.value,
    }


def explain(snap: Snapshot, src_text: str, dst_text: str, protocol: str, port: str | None) -> Explanation:
    """Judge the first packet from `src_text` to `dst_text` (pod keys or addresses).

    `protocol` is TCP, UDP, SCTP or ICMP; `port` a number or a port name on the destination
    (None for ICMP). Between two pods of different primary families, the source's address
    of the destination's family is used.
    """
    inv = snap.inventory
    src, src_ep = resolve(inv, src_text)
    dst, dst_ep = resolve(inv, dst_text)
    if src.version != dst.version and src_ep and dst_ep:
        src = pick(src_ep, dst.version) or src
    if protocol == "ICMP":
        num = None
    elif port is None:
        raise QueryError(f"--port is required for {protocol}")
    else:
        num = port_on(dst_ep, port, protocol)
        if num is None:
            raise QueryError(f"{dst_text} has no {protocol} port named {port!r}")
    fv = evaluate(snap.program, src, dst, protocol.lower(), num)
    return Explanation(src, src_ep, dst, dst_ep, protocol, num, fv)


# ------------------------------------------------------------------ matrix


def matrix(snap: Snapshot, port: str, protocol: str, family: int | None) -> dict[str, dict[str, str]]:
    """Verdict for every ordered pair of pods (self pairs: allowed, never leaves the pod)."""
    eps = sorted(snap.inventory.endpoints.values(), key=lambda e: e.key)
    by_ip = index_by_ip(snap.program)
    out: dict[str, dict[str, str]] = {}
    for s in eps:
        row = out.setdefault(s.key, {})
        for d in eps:
            dst = pick(d, family)
            src = pick(s, dst.version) if dst else None
            num = port_on(d, port, protocol)
            if src is None or dst is None or num is None:
                row[d.key] = "deny"  # no address of that family, or no such named port
                continue
            fv = evaluate(snap.program, src, dst, protocol.lower(), num, by_ip)
            row[d.key] = "allow" if fv.verdict is Verdict.ACCEPT else "deny"
    return out


# ------------------------------------------------------------------ counters


def counters(snap: Snapshot, dataplane: Dataplane) -> list[dict[str, Any]]:
    """The kernel's counter of every rule and default deny, labelled with its policy."""
    out = []
    for row in counter_rows(snap.program, dataplane.counters(snap.program)):
        tier: str | None = "policy"  # a default deny is NetworkPolicy isolation
        kind = None
        if row.default_deny:
            policy, verdict = "default deny of " + ", ".join(row.isolated_by), "drop"
        elif row.rule is None:  # counted by the kernel, gone from the program
            policy, verdict, tier = "?", "?", None
        else:
            policy, verdict = str(row.rule.origin), row.rule.verdict.value
            tier, kind = row.rule.tier.value, row.rule.origin.kind or None
        out.append({"endpoint": row.endpoint, "direction": row.direction.value, "policy": policy,
                    "verdict": verdict, "tier": tier, "kind": kind,
                    "packets": row.count.packets, "bytes": row.count.bytes})
    return out


# ------------------------------------------------------------------ explain --to-name


def to_name(snap: Snapshot, name: str, from_text: str | None = None) -> list[dict[str, Any]]:
    """The domainNames rules (ClusterNetworkPolicy egress, Accept) selecting DNS name `name`,
    one row per (pod, rule) in the snapshot's order of pods and rules; `from_text` (a pod
    key) keeps that pod's. What each pod learned is the running agent's (`merge_learned`)."""
    from agent.dns.egress import learner_rules, rule_view  # the learner's own view of the rules
    from agent.policy.cluster.domains import normalize, parse_domain
    from agent.policy.errors import Invalid

    if name.startswith("*"):
        raise QueryError(f"--to-name takes a name, not a pattern: {name!r}")
    try:
        parse_domain(name, "--to-name")
    except Invalid as e:
        raise QueryError(str(e)) from None
    keys = sorted(snap.program.endpoints)
    if from_text is not None:
        if from_text not in snap.inventory.endpoints:
            raise QueryError(f"no pod {from_text!r} with an IP in the source")
        keys = [k for k in keys if k == from_text]
    rows = []
    for key, rules in learner_rules(snap.inventory, keys).items():
        for dr in rules:
            hits = [p.text for p in dr.patterns if p.matches(name)]
            if hits:
                rows.append({"name": normalize(name), "endpoint": key, **rule_view(snap.program, key, dr.key),
                             "patterns": hits, "learned": None})
    return rows


def merge_learned(rows: list[dict[str, Any]], agent_view: dict[str, Any]) -> list[dict[str, Any]]:
    """`rows` with `learned` filled from the agent's `/dns`: a list of addresses, or None when
    the pod (or the rule) is not the agent's: not on its node, or not compiled there."""
    by = {(p["endpoint"], r["rule"]): r["learned"] for p in agent_view.get("pods", []) for r in p["rules"]}
    return [{**row, "learned": by.get((row["endpoint"], row["rule"]))} for row in rows]


def to_name_text(name: str, rows: list[dict[str, Any]], agent_note: str | None) -> list[str]:
    """`explain --to-name` as text: each pod and rule selecting the name, then the addresses
    learned there (with the name that taught each) or why they are not known."""
    if not rows:
        return [f"{name}: no domainNames rule selects this name (for these pods): egress to it is not "
                "allowed by name"]
    lines = [f"{name}: selected by {len({r['rule'] for r in rows})} domainNames rule(s) "
             f"for {len({r['endpoint'] for r in rows})} pod(s)"]
    for r in rows:
        ports = f" {', '.join(r['ports'])}" if r["ports"] else ""
        lines.append(f"  {r['endpoint']}: {r['policy'] or r['rule']}{ports} ({', '.join(r['patterns'])})")
        if agent_note is not None:
            lines.append(f"    learned: unknown ({agent_note})")
        elif r["learned"] is None:
            lines.append("    learned: unknown (not a pod of the agent's node, or not yet synced there)")
        elif not r["learned"]:
            lines.append("    learned: nothing yet (connections are denied until the pod resolves a matching name)")
        for e in r["learned"] or ():
            lines.append(f"    {e['address']:<39} for {e['name'] or '?'}, expires in {e['expires_in']:.0f} s")
    return lines
