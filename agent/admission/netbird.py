"""NetBird admission: the fetched account (raw API JSON) validated into an `nb.Account`.

Every object is validated; an invalid one keeps its last good version (`AccountStore`,
saved with the NetBird state file). A token that sees only part of the account is
refused whole (`partial_view`): a partial view must never be enforced; so is an account
without the local peer (`local_peer`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent.admission.lastgood import LastGood
from agent.inventory import IPAddress, ObjectRef, Problem, RawPolicy
from agent.policy import netbird as nb
from agent.sources.kubeobjects import RawObject
from agent.sources.netbird import FetchError, RawAccount

KINDS = (  # (kind, RawAccount attribute, API path)
    ("Policy", "policies", "policies"),
    ("Group", "groups", "groups"),
    ("Peer", "peers", "peers"),
    ("PostureCheck", "posture_checks", "posture-checks"),
)


class AccountStore(LastGood):
    """Per-object last good versions, in memory; what it keeps goes into the state file."""

    reuse = False  # admit_account's parse records invalid policies (their drops stay enforced)

    def __init__(self) -> None:
        super().__init__(None)
        self.kept: dict[str, Mapping[str, Any]] = {}

    def replace(self, good: dict[str, Mapping[str, Any]]) -> None:
        super().replace(good)
        self.kept = dict(good)


def check_complete(raw: RawAccount) -> None:
    """Raise FetchError("partial") when the token sees only part of the account."""
    why = partial_view(raw.groups, raw.peers)
    if why is not None:
        raise FetchError("partial", f"the token sees only part of the account ({why}); "
                         "use a token of a user who sees every peer")


def partial_view(groups: Any, peers: Any) -> str | None:
    """Why this /api/groups + /api/peers pair is not the whole account, or None if it is.

    A token whose user may see only some peers gets a partial /api/peers; the `All`
    group still names (or at least counts) every peer. Tolerates any shape: what cannot
    be verified counts as partial.
    """
    if not isinstance(groups, list) or not isinstance(peers, list):
        return "groups or peers is not a list"
    visible = {p.get("id") for p in peers if isinstance(p, Mapping)}
    alls = [g for g in groups if isinstance(g, Mapping) and g.get("name") == nb.ALL_GROUP]
    if len(alls) != 1:
        return f"expected exactly one '{nb.ALL_GROUP}' group, found {len(alls)}"
    all_group = alls[0]
    members = all_group.get("peers")
    ids = {m.get("id") if isinstance(m, Mapping) else m for m in members or []}
    missing = ids - visible
    if missing:
        return f"{len(missing)} of the {len(ids)} peers in group '{nb.ALL_GROUP}' are not in /api/peers"
    count = all_group.get("peers_count")
    if isinstance(count, int) and count > len(visible):
        return f"group '{nb.ALL_GROUP}' counts {count} peers but /api/peers lists {len(visible)}"
    return None


def local_peer(account: nb.Account, interface: str, peer_id: str | None,
               addresses: Sequence[IPAddress] | FetchError | None, saved: str | None = None) -> str:
    """The local peer's id: `peer_id` if given (it must be in the account), else the peer
    holding an address of `interface` (`addresses`, or why they could not be read).
    Raises FetchError("local_peer")."""
    if peer_id is not None:
        if peer_id not in account.peers:
            raise FetchError("local_peer", f"peer id {peer_id} (--netbird-peer-id) is not in /api/peers")
        return peer_id
    if isinstance(addresses, FetchError) or addresses is None:
        if saved and saved in account.peers:
            return saved  # interface down, e.g. while NetBird restarts: keep the peer we knew
        raise addresses or FetchError("local_peer", f"no addresses read from {interface}")
    addrs = set(addresses)
    for p in account.peers.values():
        if addrs.intersection(p.ips):
            return p.id
    shown = ", ".join(sorted(map(str, addrs))) or "none"
    raise FetchError("local_peer", f"no peer in /api/peers has an address of {interface} ({shown})")


def admit_account(
    raw: RawAccount, store: AccountStore, location: Callable[[str], str], problems: list[Problem]
) -> tuple[nb.Account, list[RawObject]]:
    """Validate every object; each invalid one keeps its last good version.

    Policies are read part by part (nb.read_policy): an invalid policy with a last good
    version enforces that version plus the drop rules of the invalid one (its invalid
    parts resolved fail-closed), so a broken drop never lets an accept win; without a
    last good version the invalid policy is enforced as read, fail-closed. An object
    without an id has no last good version: a policy's drops are still enforced.
    Duplicate ids are reported: every copy of a policy is reduced to its drops, a group
    or posture check becomes unknown (stricter side).

    Returns the account and the policy objects in force (for the inventory).
    """
    objects: list[RawObject] = []
    raw_ids: dict[str, set[str]] = {k: set() for k, _, _ in KINDS}
    dups: dict[str, set[str]] = {k: set() for k, _, _ in KINDS}
    anonymous: list[nb.Policy] = []
    copies: list[nb.Policy] = []  # later copies of a duplicated policy id
    for kind, attr, path in KINDS:
        loc = location(path)
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
            if pol.problems and obj.body is not store.get(obj.ref):
                invalid[obj.ref.name] = pol
                extra.extend(Problem(obj.ref, e.field, e.message) for e in pol.problems[1:])
                raise pol.problems[0]  # reported by admission; the last good version stays
            return pol
        if kind == "Group":
            return nb.parse_group(obj.body)
        if kind == "Peer":
            return nb.parse_peer(obj.body)
        return nb.parse_posture_check(obj.body)

    admitted = store.admit(objects, parse, problems)
    problems.extend(extra)
    by_kind: dict[str, dict[str, Any]] = {k: {} for k, _, _ in KINDS}
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
