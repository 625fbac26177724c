"""The nftables model: what `inet stockade` holds for a Program, built whole or from the
previous model and what changed.

`build_model` is the full build, the reference: it walks every rule of every local
endpoint. `Memo` + `update` (the dataplane's path for each event) build the same model
from the previous one: only endpoints that are not the same EndpointProgram object as
last time are walked and rendered again, rule keys are counted per peer-set content so
shared sets are renamed, refilled or dropped only where a content came or went, and a
changed peer set's elements are its rule key's previous ones edited by the prefixes that
moved (the incremental compiler keeps unchanged prefixes as the same objects, so they are
found by identity), not all its prefixes formatted again; the edit also tells the diff
what was added and removed. Whatever `update` does not follow (options changed, a model
other than its last one, an address or device two endpoints claim, a failed build) goes
through `build_model`. tests/unit/test_nft_model_update.py holds `update` to
`build_model` after every event of random event sequences.
"""

from __future__ import annotations

import hashlib
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress, count, islice
from operator import attrgetter, is_not

from agent.dataplane import nftlearn
from agent.dataplane.base import DataplaneError
from agent.dataplane.escape import display, utf8, valid_ifname
from agent.ir import (
    PORTED,
    Direction,
    DirectionProgram,
    EndpointProgram,
    Network,
    PeerSet,
    Program,
    Rule,
    Tier,
    Verdict,
    merge_ranges,
)

DENY_COMMENT = "default-deny"
DEFAULT_LOG_GROUP = 7354
MAPS = {"ingress4": "ipv4_addr", "ingress6": "ipv6_addr", "egress4": "ipv4_addr", "egress6": "ipv6_addr",
        "ingress_if": "ifname", "egress_if": "ifname"}

# A set's declaration: single addresses in hash sets, prefixes in interval sets.
HOSTS = {4: "ipv4_addr", 6: "ipv6_addr"}
NETS = {4: "ipv4_addr; flags interval", 6: "ipv6_addr; flags interval"}
_HOST_SUFFIX = {4: "/32", 6: "/128"}
# PeerSet.texts(fam) -> (single addresses, wider prefixes), cached per frozenset object
# (by identity: a WeakKeyDictionary compares equal-hashing keys element by element, ~2 ms
# per lookup of a 50k-address set), so an unchanged peer set is split once, not on every
# sync (190k texts cost ~0.1 s). An entry goes when its frozenset does.
Split = tuple[frozenset[str], frozenset[str]]
_SPLIT: dict[int, tuple[weakref.ref[frozenset[str]], Split]] = {}


def hosts_and_nets(texts: frozenset[str], fam: int) -> Split:
    """One family's prefixes split into single addresses (without the /32 or /128) and the
    wider prefixes."""
    key = id(texts)
    hit = _SPLIT.get(key)
    if hit is not None and hit[0]() is texts:
        return hit[1]
    suffix = _HOST_SUFFIX[fam]
    hosts = frozenset(t[: -len(suffix)] for t in texts if t.endswith(suffix))
    nets = frozenset(t for t in texts if not t.endswith(suffix)) if len(hosts) < len(texts) else frozenset()

    def forget(ref: weakref.ref[frozenset[str]], key: int = key) -> None:
        entry = _SPLIT.get(key)
        if entry is not None and entry[0] is ref:
            del _SPLIT[key]

    _SPLIT[key] = (weakref.ref(texts, forget), (hosts, nets))
    return hosts, nets


def _short(text: str) -> str:
    """A name-safe digest of any string. 128 bits: names are attacker-chosen, and a shorter
    digest could be matched on purpose (a pod named to share a victim's chain or set)."""
    return hashlib.blake2s(utf8(text), digest_size=16).hexdigest()


def chain_name(endpoint: str, d: Direction) -> str:
    return f"{'in' if d is Direction.INGRESS else 'out'}_{_short(endpoint)}"


# What a peer set's kernel sets hold, as text: IPv4 single addresses, wider IPv4 prefixes,
# IPv6 single addresses, wider IPv6 prefixes (hosts_and_nets of each family); the hash sets'
# and interval sets' elements are these very frozensets.
Content = tuple[frozenset[str], frozenset[str], frozenset[str], frozenset[str]]


def _content(peers: PeerSet) -> Content:
    """What a kernel peer set holds; cached per PeerSet (texts) and per text frozenset (the
    split), so hashing is paid once."""
    return (*hosts_and_nets(peers.texts(4), 4), *hosts_and_nets(peers.texts(6), 6))


def _content_sets(stem: str, c: Content) -> Iterator[tuple[str, tuple[str, frozenset[str]]]]:
    """The kernel sets of one peer set: per family its hash set of single addresses
    (always), and its interval set of prefixes when it has some."""
    for fam, hosts, nets in ((4, c[0], c[1]), (6, c[2], c[3])):
        yield f"{stem}_{fam}", (HOSTS[fam], hosts)
        if nets:
            yield f"{stem}_{fam}n", (NETS[fam], nets)


def _stem(key: str, taken: set[str]) -> str:
    """A fresh set stem named after its representative rule key, unless that name is in use."""
    name, i = f"p_{_short(key)}", 0
    while name in taken:
        i += 1
        name = "p_" + _short(f"{key}\0{i}")
    return name


def _share(program: Program, prev: Model | None,
           avoid: frozenset[str] = frozenset()) -> dict[str, tuple[Content, frozenset[str]]]:
    """Stem -> (content, rule keys) of every peer set `program` needs: one set per distinct
    content, whatever key (policy rule) asks for it. With `prev` (what the kernel holds),
    names stay put so a change costs what it touches:
    1. content some set already holds keeps that set (no element change; a key whose
       content diverged and re-converged goes back to it);
    2. a set whose content changed stays with the group of keys that used it most (element
       updates; ties: the smaller stem) so the usual event (a pod joins a selector) rewrites
       no rule line;
    3. other content gets a new set named after its smallest key; the keys that moved to
       another set get their rule lines rewritten, in the same transaction.
    Without `prev` (a fresh load) step 3 names every set, so names depend on content only
    (and on `avoid`: stems a new set must not take, those of a table being replaced)."""
    groups: dict[Content, set[str]] = {}
    by_object: dict[int, set[str]] = {}  # id(PeerSet) -> its group: equal contents compare once
    for ep in program.endpoints.values():
        for d in (Direction.INGRESS, Direction.EGRESS):
            dp = ep.direction(d)
            if dp.enforced:
                for rule in dp.rules:
                    if rule.peers is not None and not rule.learned:  # learned: sets of its own
                        keys = by_object.get(id(rule.peers))
                        if keys is None:
                            keys = by_object[id(rule.peers)] = groups.setdefault(_content(rule.peers), set())
                        keys.add(rule.key)
    out: dict[str, tuple[Content, frozenset[str]]] = {}
    pending: list[tuple[Content, set[str]]] = []
    old_by_content = prev.by_content if prev else {}
    for c, keys in groups.items():
        s = old_by_content.get(c)
        if s is not None and s not in out:
            out[s] = (c, frozenset(keys))
        else:
            pending.append((c, keys))
    if prev is not None and pending:
        old_stems: dict[str, list[str]] = {}
        for s, (_, keys) in prev.shared.items():
            for k in keys:
                old_stems.setdefault(k, []).append(s)
        rest = []
        for c, keys in sorted(pending, key=lambda g: (-len(g[1]), min(g[1]))):
            votes: dict[str, int] = {}
            for k in keys:
                for s in old_stems.get(k, ()):
                    if s not in out:
                        votes[s] = votes.get(s, 0) + 1
            if votes:
                s = min(votes, key=lambda s: (-votes[s], s))
                out[s] = (c, frozenset(keys))
            else:
                rest.append((c, keys))
        pending = rest
    taken = set(out) | avoid
    for c, keys in sorted(pending, key=lambda g: min(g[1])):
        s = _stem(min(keys), taken)
        taken.add(s)
        out[s] = (c, frozenset(keys))
    return out


def _stem_of(m: Model, peers: PeerSet) -> str:
    stem = m.by_object.get(id(peers))
    if stem is None:  # comparing equal contents costs their size: once per PeerSet object
        stem = m.by_object[id(peers)] = m.by_content[_content(peers)]
    return stem


def _peer_matches(m: Model, rule: Rule, peers: PeerSet, peer_key: str) -> list[str]:
    """The peer clauses of `rule`, one line each: per family its hash set of addresses
    (always there, maybe empty) and its interval set of prefixes (only when it has some)."""
    stem = _stem_of(m, peers)
    out = []
    for fam, proto in ((4, "ip"), (6, "ip6")):
        out += [f"{proto} {peer_key} @{s} " for s in (f"{stem}_{fam}", f"{stem}_{fam}n") if s in m.sets]
    return out


def _ports_line(rule: Rule) -> list[str]:
    """Port clauses of a rule: one concatenated set for ported protocols, one for ICMP."""
    if not rule.ports:
        return [""]
    out = []
    elems: list[tuple[str, int | str]] = []
    # nft refuses overlapping intervals in one set ("File exists"): a rule may hold e.g.
    # UDP (all ports) and UDP/80, or 80-81 and 80. Merge them per protocol first.
    spans: dict[str, list[tuple[int, int]]] = {}
    for p in rule.ports:
        if p.protocol in PORTED:
            spans.setdefault(p.protocol, []).append((0, 65535) if p.first is None else (p.first, p.last or p.first))
    for proto in sorted(spans):
        for first, last in merge_ranges(spans[proto]):
            elems.append((proto, first if first == last else f"{first}-{last}"))
    if len(elems) == 1:
        # One protocol and port (range): plain comparisons. An anonymous set per rule would
        # cost every later libnftables command a fetch of it (element updates included).
        proto, port = elems[0]
        out.append(f"meta l4proto {proto} " if port == "0-65535" else f"meta l4proto {proto} th dport {port} ")
    elif elems:
        out.append(f"meta l4proto . th dport {{ {', '.join(f'{p} . {n}' for p, n in elems)} }} ")
    if any(p.protocol == "icmp" for p in rule.ports):
        out.append("meta l4proto { icmp, ipv6-icmp } ")
    return out


@dataclass
class Model:
    """The table's variable contents; the static part is `_base_chains`."""

    sets: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    maps: dict[str, dict[str, str]] = field(default_factory=lambda: {m: {} for m in MAPS})
    # chain -> (endpoint, direction), written into the chain's comment
    owners: dict[str, tuple[str, Direction]] = field(default_factory=dict)
    # peer-set stem -> (content, rule keys using it), and content -> stem (see _share)
    shared: dict[str, tuple[Content, frozenset[str]]] = field(default_factory=dict, compare=False)
    by_content: dict[Content, str] = field(default_factory=dict, compare=False)
    # id(PeerSet) -> stem while build_model runs (the program keeps those objects alive)
    by_object: dict[int, str] = field(default_factory=dict, compare=False, repr=False)
    # learned-address sets (agent/dataplane/nftlearn.py) -> type: declared and deleted here,
    # their elements only ever written by `learn`
    learned: dict[str, str] = field(default_factory=dict)
    # id(elements) -> (elements, the elements they were edited from, removed, added): what
    # `update` edited, so that diff need not compare whole sets (see nftables.diff)
    edits: dict[int, tuple[frozenset[str], frozenset[str], frozenset[str], frozenset[str]]] = \
        field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Options:
    """How drops are rendered. Audit mode counts and logs what would be dropped, drops nothing."""

    audit: bool = False
    log_group: int | None = DEFAULT_LOG_GROUP  # NFLOG group for sampled drops; None: no logging
    log_rate: str = "10/second burst 20 packets"  # per rule, in the kernel


@dataclass(frozen=True)
class _Built:
    """What one endpoint gave the model, and what it depends on besides the endpoint."""

    ep: EndpointProgram
    stems: tuple[tuple[PeerSet, str], ...]  # each rule's peers and the set stem they had
    chains: dict[str, tuple[str, ...]]
    owners: dict[str, tuple[str, Direction]]
    maps: tuple[tuple[str, str, str], ...]  # (map, key, verdict)
    learned: tuple[tuple[str, str], ...] = ()  # learned-address sets of its rules: (name, type)
    refs: tuple[tuple[str, PeerSet], ...] = ()  # (rule key, peers) of each rule with a peer set


@dataclass
class Memo:
    """An incremental build's memory (see build_model): per endpoint key, what the endpoint
    last gave. The incremental compiler hands back an unchanged endpoint as the same
    EndpointProgram object, so an endpoint that is the same object, and whose rules' peers
    kept their set stems, gives the same chains and map entries: they are reused as they
    are, not rendered again. Pure memoisation: a stale entry is never used, so any history
    builds what a build without memo builds."""

    opts: Options | None = None
    endpoints: dict[str, _Built] = field(default_factory=dict)
    # What `update` follows from: the model it (or build_model through it) built last, and
    # the tallies of that build (None: unknown, the next update builds in full).
    model: Model | None = None
    tally: _Tally | None = None


def build_model(program: Program, opts: Options = Options(), prev: Model | None = None,
                memo: Memo | None = None, avoid: frozenset[str] = frozenset()) -> Model:
    """The table for `program`. `prev`, the model the kernel holds, keeps shared peer sets'
    names stable across changes (see _share); without it names follow content alone. With
    `memo` (kept across calls by the caller), endpoints unchanged since the last call reuse
    what they gave then; the result is the same. New peer sets take no stem in `avoid`."""
    m = Model()
    m.shared = _share(program, prev, avoid)
    for stem, (content, _) in m.shared.items():
        m.by_content[content] = stem
        m.sets.update(_content_sets(stem, content))
    guard = PeerSet.of(program.guard)
    # The endpoints' own addresses, not a collapsed PeerSet: adjacent addresses would merge
    # into prefixes, which a set of single addresses cannot hold.
    known = {ip for ep in program.endpoints.values() for ip in ep.ips} if program.guard else set()
    for fam in (4, 6):
        m.sets[f"guard{fam}"] = (NETS[fam], guard.texts(fam))
        m.sets[f"known{fam}"] = (HOSTS[fam], frozenset(str(ip) for ip in known if ip.version == fam))
    if memo is not None and memo.opts != opts:
        memo.opts, memo.endpoints = opts, {}
    built = memo.endpoints if memo is not None else {}
    for key, ep in program.endpoints.items():
        b = built.get(key)
        if b is None or b.ep is not ep or any(_stem_of(m, p) != s for p, s in b.stems):
            b = _endpoint(m, ep, opts)
            if memo is not None:
                built[key] = b
        m.chains.update(b.chains)
        m.owners.update(b.owners)
        m.learned.update(b.learned)
        for mname, k, v in b.maps:
            m.maps[mname][k] = v
    if memo is not None and len(built) > len(program.endpoints):
        for key in [k for k in built if k not in program.endpoints]:
            del built[key]
    m.by_object = {}  # ids are only valid while `program` lives
    return m


@dataclass(frozen=True)
class _Peers:
    """A peer set's kernel content, worked out once per PeerSet object."""

    peers: PeerSet  # kept alive while its id is a key of _Tally.peers
    content: Content


@dataclass
class _Tally:
    """What `update` keeps of the last build besides the endpoints' _Built: which rule keys
    use each peer-set content, and how often each map entry is claimed."""

    guard: tuple[object, ...] = ()
    groups: dict[Content, dict[str, int]] = field(default_factory=dict)  # content -> key -> uses
    peers: dict[int, _Peers] = field(default_factory=dict)  # id(PeerSet) -> its content
    uses: dict[int, int] = field(default_factory=dict)  # id(PeerSet) -> rules using it
    last: dict[str, PeerSet] = field(default_factory=dict)  # rule key -> its peers (a delta's base)
    keys: dict[str, int] = field(default_factory=dict)  # rule key -> rules using it
    claims: dict[tuple[str, str], int] = field(default_factory=dict)  # (map, key) -> endpoints
    edits: Edits = field(default_factory=dict)  # this update's (see _edit)


def _whole(p: PeerSet) -> _Peers:
    return _Peers(p, _content(p))


def _moved(old: tuple[Network, ...], new: tuple[Network, ...], lo: tuple[int, int],
           hi: tuple[int, int]) -> tuple[list[Network], list[Network]]:
    """(objects of old[lo[0]:hi[0]] not in new[lo[1]:hi[1]], and the other way round), by
    identity; each tuple holds an object once. Past the common head and tail (found by C
    iterators, no Python step per prefix, nothing copied), only the middles are compared."""
    n = min(hi[0] - lo[0], hi[1] - lo[1])
    i = next(compress(count(), map(is_not, islice(old, lo[0], hi[0]), islice(new, lo[1], hi[1]))), n)
    tails = (islice(reversed(old), len(old) - hi[0], None), islice(reversed(new), len(new) - hi[1], None))
    j = min(next(compress(count(), map(is_not, *tails)), n), n - i)
    mid_old, mid_new = old[lo[0] + i : hi[0] - j], new[lo[1] + i : hi[1] - j]
    if not mid_old or not mid_new:
        return list(mid_old), list(mid_new)
    a = dict(zip(map(id, mid_old), mid_old, strict=True))
    b = dict(zip(map(id, mid_new), mid_new, strict=True))
    return [a[k] for k in a.keys() - b.keys()], [b[k] for k in b.keys() - a.keys()]


_VERSION = attrgetter("version")


def _cut(nets: tuple[Network, ...]) -> int:
    """Where the IPv6 prefixes start (PeerSet keeps IPv4 first). Only a speed-up: _delta is
    right wherever the cut falls, see there."""
    return bisect_left(nets, 6, key=_VERSION)


# One update's edits: (id of the frozenset edited, removed, added) -> (it, the result). Rules
# whose peers hold the same pods change alike: their sets edited once, into one object, so
# their contents compare by identity, not element by element, and are hashed once.
Edits = dict[tuple[int, frozenset[str], frozenset[str]], tuple[frozenset[str], frozenset[str]]]


def _edit(texts: frozenset[str], rm: set[str], add: set[str], edits: Edits) -> frozenset[str]:
    """texts less `rm` plus `add`, copied once where one side is empty (the usual event)."""
    key = (id(texts), frozenset(rm), frozenset(add))
    hit = edits.get(key)
    if hit is not None and hit[0] is texts:
        return hit[1]
    out = texts - rm if rm else texts
    out = out | add if add else out
    edits[key] = (texts, out)
    return out


def _delta(base: _Peers, p: PeerSet, edits: Edits) -> _Peers:
    """p's content as base's edited by the prefixes that moved (text formatted for those
    only). The incremental compiler keeps the prefix objects a peer set did not lose (and
    PeerSet.of shares them), so what moved is what one side holds as an object the other
    does not. Each family is compared apart, as a speed-up: two changes, one per family,
    leave one short middle each. Exact however the parts fall: a prefix that turns up
    removed from one part and added to another, or removed and added as an equal object,
    is taken out and put back (every removal applies before any addition)."""
    old, new = base.peers.nets, p.nets
    co, cn = _cut(old), _cut(new)
    gone, fresh = _moved(old, new, (0, 0), (co, cn))
    g6, f6 = _moved(old, new, (co, cn), (len(old), len(new)))
    content = list(base.content)
    for i, fam in enumerate((4, 6)):
        rm = {str(n) for n in (*gone, *g6) if n.version == fam}
        add = {str(n) for n in (*fresh, *f6) if n.version == fam}
        if not rm and not add:
            continue  # the family's frozensets stay the same objects (diff skips them)
        suffix = _HOST_SUFFIX[fam]
        rm_hosts = {t[: -len(suffix)] for t in rm if t.endswith(suffix)}
        add_hosts = {t[: -len(suffix)] for t in add if t.endswith(suffix)}
        content[2 * i] = _edit(content[2 * i], rm_hosts, add_hosts, edits)
        if len(rm_hosts) < len(rm) or len(add_hosts) < len(add):
            content[2 * i + 1] = _edit(content[2 * i + 1], {t for t in rm if not t.endswith(suffix)},
                                       {t for t in add if not t.endswith(suffix)}, edits)
    return _Peers(p, (content[0], content[1], content[2], content[3]))


def _peers_of(t: _Tally, key: str, p: PeerSet) -> _Peers:
    info = t.peers.get(id(p))
    if info is None:
        base = t.last.get(key)
        binfo = t.peers.get(id(base)) if base is not None else None
        info = _delta(binfo, p, t.edits) if binfo is not None and binfo.peers is base else _whole(p)
        t.peers[id(p)] = info
    return info


def _refs(ep: EndpointProgram) -> list[tuple[str, PeerSet]]:
    """(rule key, peers) of each rule of `ep` with a peer set in a kernel set (as _endpoint)."""
    return [(r.key, r.peers) for d in (ep.ingress, ep.egress) if d.enforced
            for r in d.rules if r.peers is not None and not r.learned]


def _tally_refs(t: _Tally, refs: Iterable[tuple[str, PeerSet]], sign: int, touched: dict[Content, _Peers],
                idle: set[int | str] | None = None) -> None:
    """Add (sign 1) or take away (-1) rules' uses of their peer sets; `touched` collects the
    contents whose keys changed, `idle` the peer sets no rule uses any more."""
    for key, p in refs:
        info = _peers_of(t, key, p)
        keys = t.groups.setdefault(info.content, {})
        n = keys[key] = keys.get(key, 0) + sign
        if not n:
            del keys[key]
            if not keys:
                del t.groups[info.content]
        touched[info.content] = info
        n = t.uses[id(p)] = t.uses.get(id(p), 0) + sign
        if not n and idle is not None:
            idle.add(id(p))
        n = t.keys[key] = t.keys.get(key, 0) + sign
        if not n and idle is not None:
            idle.add(key)
        if sign > 0:
            t.last[key] = p


def _tally_claims(t: _Tally, b: _Built, sign: int) -> bool:
    """Add or take away an endpoint's claims on map entries. False when another endpoint
    claims one too: which of them wins is the program's order, build_model's business."""
    alone = True
    for mname, k, _ in b.maps:
        n = t.claims.get((mname, k), 0)
        alone = alone and (n <= 1 if sign < 0 else n == 0)
        if n + sign:
            t.claims[(mname, k)] = n + sign
        else:
            del t.claims[(mname, k)]
    return alone


def _prune(t: _Tally, idle: set[int | str]) -> None:
    """Forget peer sets (by id) and rule keys (by name) no rule uses any more; after the
    build: a departed rule's peers are the base of its key's new ones."""
    for i in idle:
        if isinstance(i, int):
            if not t.uses.get(i):
                t.uses.pop(i, None)
                t.peers.pop(i, None)
        elif not t.keys.get(i):
            t.keys.pop(i, None)
            t.last.pop(i, None)


def update(program: Program, opts: Options = Options(), prev: Model | None = None,
           memo: Memo | None = None, avoid: frozenset[str] = frozenset()) -> Model:
    """What build_model(program, opts, prev, memo, avoid) builds, from `prev` and what
    changed since when `prev` is the model `memo` last gave (the dataplane's event path):
    endpoints that are not the same EndpointProgram object as last time are rendered
    again, peer-set contents whose keys changed get their set kept, refilled, renamed or
    dropped as _share decides, everything else is prev's. Otherwise, or on anything it
    does not follow (see _tally_claims), a full build_model, whose tallies it keeps for
    next time. Should it raise (an endpoint's device name refused), the next call is full."""
    if memo is None:
        return build_model(program, opts, prev, None, avoid)
    t = memo.tally
    memo.tally = None  # until this build is complete: an error leaves the next one full
    if t is None or prev is None or memo.model is not prev or memo.opts != opts or avoid:
        return _rebuild(program, opts, prev, memo, avoid)
    built = memo.endpoints
    eps = program.endpoints
    changed = [(k, ep) for k, ep in eps.items() if (b := built.get(k)) is None or b.ep is not ep]
    gone = list(built.keys() - eps.keys()) if len(built) != len(eps) or changed else []
    if not changed and not gone and program.guard == t.guard:
        memo.tally = t
        return prev
    # 1. the tallies: what the changed and departed endpoints used, and use now
    touched: dict[Content, _Peers] = {}
    olds = [built[k] for k in gone] + [built[k] for k, _ in changed if k in built]
    alone = True
    idle: set[int | str] = set()
    for b in olds:
        _tally_refs(t, b.refs, -1, touched, idle)
        alone = _tally_claims(t, b, -1) and alone
    m = Model(sets=dict(prev.sets), chains=dict(prev.chains), maps={k: dict(v) for k, v in prev.maps.items()},
              owners=dict(prev.owners), learned=dict(prev.learned))
    for b in olds:
        for name in b.chains:
            m.chains.pop(name, None)
            m.owners.pop(name, None)
        for name, _ in b.learned:
            m.learned.pop(name, None)
        for mname, k, _ in b.maps:
            if (mname, k) not in t.claims:
                m.maps[mname].pop(k, None)
    for k in gone:
        del built[k]
    refs = [r for _, ep in changed for r in _refs(ep)]
    _tally_refs(t, refs, 1, touched)
    # 2. the shared sets (_share's steps, for the contents whose keys changed)
    m.shared, m.by_content = dict(prev.shared), dict(prev.by_content)
    freed: dict[str, frozenset[str]] = {}
    pending: list[tuple[Content, set[str]]] = []
    for c in touched:
        keys = t.groups.get(c)
        s = prev.by_content.get(c)
        if s is not None:
            if keys:
                m.shared[s] = (prev.shared[s][0], frozenset(keys))
            else:
                freed[s] = prev.shared[s][1]
                del m.shared[s], m.by_content[c]
        elif keys:
            pending.append((c, set(keys)))
    old_stems: dict[str, list[str]] = {}
    for s, keys in freed.items():
        for k in keys:
            old_stems.setdefault(k, []).append(s)
    placed: dict[str, Content] = {}
    rest = []
    for c, keys in sorted(pending, key=lambda g: (-len(g[1]), min(g[1]))):
        votes: dict[str, int] = {}
        for k in keys:
            for s in old_stems.get(k, ()):
                if s not in m.shared:
                    votes[s] = votes.get(s, 0) + 1
        if votes:
            s = min(votes, key=lambda s: (-votes[s], s))
            m.shared[s], placed[s] = (c, frozenset(keys)), c
        else:
            rest.append((c, keys))
    taken = set(m.shared)
    for c, keys in sorted(rest, key=lambda g: min(g[1])):
        s = _stem(min(keys), taken)
        taken.add(s)
        m.shared[s], placed[s] = (c, frozenset(keys)), c
    for s in freed:
        if s not in placed:
            for name in (f"{s}_4", f"{s}_4n", f"{s}_6", f"{s}_6n"):
                m.sets.pop(name, None)
    for s, c in placed.items():
        m.by_content[c] = s
        for fam in (4, 6):
            m.sets.pop(f"{s}_{fam}n", None)
        m.sets.update(_content_sets(s, c))
    # 3. guard and known addresses (the node's own endpoints), when they may have changed
    if program.guard != t.guard:
        guard = PeerSet.of(program.guard)
        for fam in (4, 6):
            m.sets[f"guard{fam}"] = (NETS[fam], guard.texts(fam))
    if program.guard != t.guard or (program.guard and (gone or any(
            k not in built or built[k].ep.ips != ep.ips for k, ep in changed))):
        known = {ip for ep in eps.values() for ip in ep.ips} if program.guard else set()
        for fam in (4, 6):
            m.sets[f"known{fam}"] = (HOSTS[fam], frozenset(str(ip) for ip in known if ip.version == fam))
    # 4. the changed endpoints' chains and map entries
    for _, p in refs:
        m.by_object[id(p)] = m.by_content[t.peers[id(p)].content]
    for key, ep in changed:
        try:
            b = built[key] = _endpoint(m, ep, opts)
        except DataplaneError:
            built.clear()  # some were rendered against this unfinished model
            raise
        alone = _tally_claims(t, b, 1) and alone
        m.chains.update(b.chains)
        m.owners.update(b.owners)
        m.learned.update(b.learned)
        for mname, k, v in b.maps:
            m.maps[mname][k] = v
    m.by_object = {}
    m.edits = {id(out): (out, base, rm, add) for (_, rm, add), (base, out) in t.edits.items()}
    t.edits = {}
    _prune(t, idle)
    t.guard = program.guard
    if not alone:
        for key, _ in changed:  # rendered against this model: not for build_model's memo
            del built[key]
        return _rebuild(program, opts, prev, memo, avoid)
    memo.model, memo.tally = m, t
    return m


def _rebuild(program: Program, opts: Options, prev: Model | None, memo: Memo, avoid: frozenset[str]) -> Model:
    """build_model in full, and the tallies `update` follows from next time."""
    m = build_model(program, opts, prev, memo, avoid)
    t = _Tally(guard=program.guard)
    for b in memo.endpoints.values():
        _tally_refs(t, b.refs, 1, {})
        _tally_claims(t, b, 1)
    memo.model, memo.tally = m, t
    return m


def _endpoint(m: Model, ep: EndpointProgram, opts: Options) -> _Built:
    """The chains and map entries of one endpoint (both directions) in model `m`."""
    chains: dict[str, tuple[str, ...]] = {}
    owners: dict[str, tuple[str, Direction]] = {}
    maps: list[tuple[str, str, str]] = []
    stems: list[tuple[PeerSet, str]] = []
    refs: list[tuple[str, PeerSet]] = []
    learned: dict[str, str] = {}
    for d in (Direction.INGRESS, Direction.EGRESS):
        dp = ep.direction(d)
        if not dp.enforced:
            continue
        name = chain_name(ep.key, d)
        mine = _chain_rules(m, dp, d, name, opts)
        owners.update((c, (ep.key, d)) for c in mine)
        shared = [(r.key, r.peers) for r in dp.rules if r.peers is not None and not r.learned]
        refs += shared
        stems += [(p, _stem_of(m, p)) for _, p in shared]
        for r in dp.rules:
            if r.learned:
                learned.update(nftlearn.rule_sets(r))
        if ep.interface is not None:
            if not valid_ifname(ep.interface):
                # nft cannot name such a device in a quoted string; refuse loudly rather
                # than render it (or leave the endpoint's traffic unjudged).
                raise DataplaneError(f"endpoint {display(ep.key, 200)}: field interface: "
                                     f"{display(ep.interface, 64)!r} is not a valid device name")
            # The host behind a device: keyed by the device, so an endpoint whose
            # addresses are not known yet (NetBird before its first sync) is covered too.
            maps.append((f"{d.value}_if", f'"{ep.interface}"', f"jump {name}"))
            if d is Direction.INGRESS:
                mine[name] = ("fib daddr type != local return", *mine[name])  # routed, not for this host
        else:
            maps += [(f"{d.value}{ip.version}", str(ip), f"jump {name}") for ip in ep.ips]
        chains.update(mine)
    return _Built(ep, tuple(stems), chains, owners, tuple(maps), tuple(sorted(learned.items())), tuple(refs))


def _log(opts: Options, chain: str, what: str) -> str:
    """A rate-limited NFLOG statement; the prefix lets the reader name chain and rule."""
    mode = "A" if opts.audit else "D"
    return f'limit rate {opts.log_rate} log prefix "stk {mode} {chain} {what}" group {opts.log_group} '


def tail_name(chain: str) -> str:
    """The chain holding what follows the ADMIN tier when an ADMIN Pass must skip the rest of it."""
    return f"{chain}_t"


def _chain_rules(m: Model, dp: DirectionProgram, d: Direction, chain: str, opts: Options) -> dict[str, tuple[str, ...]]:
    """The chain(s) of one endpoint direction, in `ir.first_match` order: ADMIN lines, POLICY
    lines, the isolation's default deny, BASELINE lines. An ADMIN Pass must skip the rest of
    the ADMIN tier, so a direction with one is split: `chain` keeps the ADMIN lines (Pass:
    `goto` the tail) and ends in `goto` the tail, which holds the rest. `goto`, not `jump`:
    a `return` in the tail goes straight back to the base chain, as one from `chain` would."""
    tiers = {t: [r for r in dp.rules if r.tier is t] for t in Tier}
    split = any(r.verdict is Verdict.PASS for r in tiers[Tier.ADMIN])
    tail = tail_name(chain) if split else chain
    head = _lines(m, tiers[Tier.ADMIN], d, chain, tail, opts)
    rest = _lines(m, tiers[Tier.POLICY], d, tail, tail, opts)
    if dp.isolated:
        if opts.log_group is not None:
            rest.append(_log(opts, tail, "deny").rstrip())
        rest.append(f'counter {"" if opts.audit else "drop "}comment "{DENY_COMMENT}"')
    else:  # under isolation the default deny decides before BASELINE is reached: no dead lines
        rest += _lines(m, tiers[Tier.BASELINE], d, tail, tail, opts)
    if split:
        return {chain: (*head, f"goto {tail}"), tail: tuple(rest)}
    return {chain: (*head, *rest)}


def _lines(m: Model, rules: list[Rule], d: Direction, chain: str, tail: str, opts: Options) -> list[str]:
    """Counted lines of `rules` in `chain`: accept (and a BASELINE Pass) `return` (allow, so
    the other side is still judged), drop drops (audit: logs and returns), an ADMIN Pass
    goes to `tail`. Comments `r:<id>` map counters and drop samples back to the rule."""
    peer_key = "saddr" if d is Direction.INGRESS else "daddr"
    # In audit mode a drop decides like a drop (stops this side's evaluation) but lets it pass.
    verdict = {Verdict.ACCEPT: "return", Verdict.DROP: "return" if opts.audit else "drop"}
    lines = []
    for rule in rules:
        action = f"goto {tail}" if rule.verdict is Verdict.PASS and rule.tier is Tier.ADMIN \
            else verdict[rule.effect]
        tail_text = f"counter {action} comment \"r:{rule.id}\""
        logged = rule.verdict is Verdict.DROP and opts.log_group is not None
        matches = []
        ports = _ports_line(rule)
        if rule.learned:  # its peers are the kernel's learned sets, not `peers`
            matches = [f"{peer}{p}" for peer in nftlearn.peer_matches(rule, peer_key) for p in ports]
        elif rule.peers is None:
            matches = ports
        else:
            matches = [f"{peer}{p}" for peer in _peer_matches(m, rule, rule.peers, peer_key) for p in ports]
        for match in matches:
            if logged:
                lines.append(f"{match}{_log(opts, chain, 'r:' + rule.id)}".rstrip())
            lines.append(f"{match}{tail_text}")
    return lines

