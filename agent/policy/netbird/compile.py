"""NetBird account -> IR for the local peer, and the Inventory for explain/matrix. Pure."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.inventory import Endpoint, Inventory, Problem
from agent.ir import (
    Direction,
    DirectionProgram,
    EndpointProgram,
    Network,
    Origin,
    PeerSet,
    PortMatch,
    Program,
    Rule,
    Verdict,
    merge_ranges,
)
from agent.policy.netbird.model import (
    _INSIDE_PREFIX,
    ALL_GROUP,
    CTX_ACCOUNT,
    CTX_LOCAL_PEER,
    DEFAULT_INTERFACE,
    DEFAULT_RANGES,
    SOURCE,
    Account,
    NbRule,
    Peer,
    Policy,
)
from agent.policy.netbird.posture import Posture, posture

# ---------------------------------------------------------------- compiling


@dataclass
class Compiled:
    program: Program
    warnings: list[Problem]


def bootstrap_program(interface: str = DEFAULT_INTERFACE) -> Program:
    """What to enforce before the first successful sync: inbound on `interface` denied
    except replies; outbound untouched. The local peer is not known yet, so the endpoint
    has no addresses: dataplanes match on the interface alone."""
    ep = EndpointProgram(
        key=f"netbird-bootstrap:{interface}",
        ips=(),
        ingress=DirectionProgram(isolated=True, isolated_by=("netbird (bootstrap: no sync yet)",)),
        egress=DirectionProgram(),
        interface=interface,
    )
    return Program(source=SOURCE, endpoints={ep.key: ep})


def _complement(inside: Sequence[Network]) -> list[Network]:
    """Every address (both families) not in `inside`, as prefixes."""
    out: list[Network] = []
    for universe in (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")):
        nets: list[Network] = [universe]
        for ex in inside:
            if ex.version != universe.version:
                continue
            nxt: list[Network] = []
            for n in nets:
                if not n.overlaps(ex):
                    nxt.append(n)
                elif not ex.supernet_of(n):  # type: ignore[arg-type]
                    nxt.extend(n.address_exclude(ex))  # type: ignore[arg-type]
            nets = nxt
        out.extend(nets)
    return out


def inside_network(account: Account, ranges: Sequence[Network]) -> PeerSet:
    """The configured NetBird ranges plus the network of any peer address outside them."""
    nets: list[Network] = list(ranges)
    for peer in account.peers.values():
        for ip in peer.ips:
            if not any(ip.version == r.version and ip in r for r in ranges):
                nets.append(ipaddress.ip_network(f"{ip}/{_INSIDE_PREFIX[ip.version]}", strict=False))
    return PeerSet.of(nets)


class _Compiler:
    def __init__(self, account: Account, local: Peer) -> None:
        self.account = account
        self.local = local
        self.warnings: list[Problem] = []
        self._all = next((g for g in account.groups.values() if g.name == ALL_GROUP), None)

    def warn(self, policy: Policy, field: str, message: str) -> None:
        self.warnings.append(Problem(policy.ref, field, f"{message} (policy {policy.name!r})"))

    def _group_peers(self, policy: Policy, rule: NbRule, field: str, gid: str) -> list[str]:
        if gid in self.account.unknown_groups:
            if rule.action is Verdict.DROP:  # unknown members: drop from everyone
                self.warn(policy, field, f"group {gid} is invalid; drop rule applied to every peer")
                return list(self.account.peers)
            self.warn(policy, field, f"group {gid} is invalid; accept rule matches nobody from it")
            return []
        g = self.account.groups.get(gid)
        if g is None:
            return []  # unknown groups produce nothing
        if g is self._all:
            return list(self.account.peers)  # All means every peer, whatever it lists
        return list(g.peers)

    def side(self, policy: Policy, rule: NbRule, which: str) -> tuple[list[Peer], bool]:
        """The peers of one side (minus L) and whether L is on it."""
        is_src = which == "sources"
        res = rule.source_resource if is_src else rule.destination_resource
        groups = rule.sources if is_src else rule.destinations
        field = f"rules[{rule.index}].{which}"
        ids: list[str] = []
        if which in rule.void_sides:  # invalid in an accept: already reported, matches nobody
            return [], False
        if which in rule.any_sides:  # invalid in a drop: already reported, every peer
            ids = list(self.account.peers)
        elif res is not None and res.type == "peer" and res.id:
            ids = [res.id]
        else:
            if res is not None:
                self.warn(policy, f"rules[{rule.index}].{'sourceResource' if is_src else 'destinationResource'}",
                          f"resource type {res.type!r} is not supported here; using the groups")
            if not groups:
                key = "sourceResource" if is_src else "destinationResource"
                if rule.action is Verdict.DROP:
                    # NetBird issue #3583 loses sides of later rules: a drop that lost one
                    # must not let the accepts it was meant to override win.
                    self.warn(policy, field, f"rule {rule.name!r} has neither {which} nor {key}: "
                                             "drop rule applied to every peer there")
                    ids = list(self.account.peers)
                else:
                    self.warn(policy, field, f"rule {rule.name!r} has neither {which} nor {key}: matches nothing")
                    return [], False
            for gid in groups or ():
                ids.extend(self._group_peers(policy, rule, field, gid))
        peers: list[Peer] = []
        seen: set[str] = set()
        for pid in ids:
            if pid in seen or pid not in self.account.peers:
                continue
            seen.add(pid)
            peer = self.account.peers[pid]
            if is_src and (policy.posture_checks or policy.posture_unknown):
                p = posture(self.account, policy.posture_checks, peer)
                if policy.posture_unknown and p is Posture.PASS:
                    p = Posture.UNKNOWN  # an unreadable check reference
                # UNKNOWN takes the stricter side: out of accepts, kept in drops.
                keep = p is Posture.PASS or (p is Posture.UNKNOWN and rule.action is Verdict.DROP)
                if not keep:
                    continue
            peers.append(peer)
        local_in = any(p.id == self.local.id for p in peers)
        return [p for p in peers if p.id != self.local.id], local_in

    @staticmethod
    def ports(rule: NbRule) -> tuple[PortMatch, ...]:
        proto = "tcp" if rule.protocol == "netbird-ssh" else rule.protocol
        if proto == "all":
            return ()
        if proto == "icmp":
            return (PortMatch("icmp"),)
        if rule.ports:  # ports win; the API refuses both, but old data may carry both
            return PortMatch.canonical(PortMatch(proto, p, p) for p in rule.ports)
        if rule.port_ranges:
            # Merged: overlapping or adjacent ranges are one match (and PortMatch has no order
            # of its own: a plain sort of two or more of them raised TypeError).
            return PortMatch.canonical(PortMatch(proto, a, b) for a, b in merge_ranges(rule.port_ranges))
        return (PortMatch(proto),)

    def rules(self, policy: Policy) -> tuple[list[Rule], list[Rule]]:
        """(ingress, egress) rules of one enabled policy, in rule order."""
        ingress: list[Rule] = []
        egress: list[Rule] = []
        for rule in policy.rules:
            if not rule.enabled or rule.void:
                continue
            if rule.ports and rule.port_ranges:
                self.warn(policy, f"rules[{rule.index}].port_ranges",
                          "both ports and port_ranges given: port_ranges ignored, as NetBird does")
            srcs, local_in_src = self.side(policy, rule, "sources")
            dsts, local_in_dst = self.side(policy, rule, "destinations")
            ports = self.ports(rule)

            def make(d: Direction, side: str, peers: list[Peer], rule: NbRule = rule,
                     ports: tuple[PortMatch, ...] = ports) -> Rule:
                origin = Origin(SOURCE, "", policy.name, d, rule.index, rule.name)
                return Rule(
                    origin,
                    PeerSet.of(ip for p in peers for ip in p.ips),
                    ports,
                    rule.action,
                    # The peer set is "this rule's sources" or "... destinations", whichever
                    # direction uses it: one key per side, stable across IP changes.
                    # The id quoted: no id can spell another's key (or a variant's), which
                    # would give one key two peer sets and fail the whole apply.
                    key=f"{SOURCE}:{json.dumps(policy.id)}{policy.variant}/{rule.index}/{side}",
                )

            if local_in_dst:
                ingress.append(make(Direction.INGRESS, "src", srcs))
            if local_in_src:
                egress.append(make(Direction.EGRESS, "dst", dsts))
            if rule.bidirectional:
                if local_in_src:
                    ingress.append(make(Direction.INGRESS, "dst", dsts))
                if local_in_dst:
                    egress.append(make(Direction.EGRESS, "src", srcs))
        return ingress, egress


def _drops_first(rules: list[Rule]) -> tuple[Rule, ...]:
    return tuple(r for r in rules if r.verdict is Verdict.DROP) + tuple(
        r for r in rules if r.verdict is not Verdict.DROP
    )


def compile_account(
    account: Account,
    local_peer: str,
    *,
    interface: str = DEFAULT_INTERFACE,
    ranges: Sequence[Network] = DEFAULT_RANGES,
    inbound_only: bool = False,
) -> Compiled:
    """The IR for the local peer (by id). Raises KeyError if the peer is unknown."""
    local = account.peers[local_peer]
    comp = _Compiler(account, local)
    ingress: list[Rule] = []
    egress: list[Rule] = []
    for policy in account.policies:
        if not policy.enabled:
            continue
        i, e = comp.rules(policy)
        ingress.extend(i)
        egress.extend(e)
    by = (f"{SOURCE} default deny inbound on {interface}",)
    if inbound_only:
        eg = DirectionProgram()
    else:
        outside = Rule(
            Origin(SOURCE, "", "(outside the NetBird network)", Direction.EGRESS, 0),
            PeerSet.of(_complement(inside_network(account, ranges).nets)),
            (),
            Verdict.ACCEPT,
            key=f"{SOURCE}:outside-network",
        )
        eg = DirectionProgram(
            isolated=True,
            rules=(*_drops_first(egress), outside),
            isolated_by=(f"{SOURCE} default deny outbound to the NetBird network",),
        )
    ep = EndpointProgram(
        key=local.name,
        ips=local.ips,
        ingress=DirectionProgram(isolated=True, rules=_drops_first(ingress), isolated_by=by),
        egress=eg,
        interface=interface,
    )
    return Compiled(Program(source=SOURCE, endpoints={ep.key: ep}), comp.warnings)


# ---------------------------------------------------------------- inventory glue


def account_inventory(account: Account, local_peer: str, interface: str = DEFAULT_INTERFACE,
                      problems: Iterable[Problem] = ()) -> Inventory:
    """An Inventory for explain/matrix: every peer as an endpoint, policies as raw refs."""
    inv = Inventory(problems=list(problems))
    names: dict[str, int] = {}
    for p in account.peers.values():
        names[p.name] = names.get(p.name, 0) + 1
    for p in sorted(account.peers.values(), key=lambda p: (p.id != local_peer, p.name, p.id)):
        # Peer names are not unique in NetBird; the local peer keeps its plain name.
        name = p.name if names[p.name] == 1 or p.id == local_peer else f"{p.name}~{p.id}"
        inv.endpoints[name] = Endpoint("", name, p.ips, {"netbird.id": p.id}, interface=interface)
    inv.context[CTX_ACCOUNT] = account
    inv.context[CTX_LOCAL_PEER] = local_peer
    return inv
