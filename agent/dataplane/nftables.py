"""nftables dataplane: the IR as one `inet stockade` table, changed by atomic diffs.

Layout (see README "The nft table"):
- base chains `forward`, `input` (hooks at priority filter) and `output`: replies and
  related ICMP pass, IPv6 neighbour discovery passes, then verdict maps keyed by the
  local endpoint's address jump to its chains: `egress4/6` by source address,
  `ingress4/6` by destination address. `output` only judges egress: traffic from
  the node into its pods is always allowed.
- per endpoint and enforced direction a chain `in_<id>` / `out_<id>`; each IR rule
  becomes one line per address family that `return`s (allow, so the other side is
  still judged) or drops, with a counter; an isolated chain ends in a counted drop.
  Tiers (ir.first_match): ADMIN lines, POLICY lines, the default deny, then BASELINE
  lines (left out under isolation: never reached). A direction with an ADMIN Pass is
  split: `in_<id>` holds the ADMIN lines, a Pass is `counter goto in_<id>_t`, the chain
  ends in `goto in_<id>_t`, and that tail chain holds the rest.
- per distinct peer content and family a hash set `p_<hash>_4` / `p_<hash>_6` holding the
  peers' single addresses (pods), and, only when the peers include wider prefixes (ipBlocks),
  an interval set `p_<hash>_4n` / `p_<hash>_6n` holding those: a membership change is element
  adds and deletes, not a rule rewrite. Rule keys (policy rules) with equal peers share one
  set, named after the smallest of them and kept while its content lives (see _share): the
  same selectors in many policies cost their addresses once. Addresses stay out of interval sets because nft
  (1.0.x) fetches every element of every interval set in the table before any element
  command, so with 190k pod addresses there each update cost ~250 ms; against hash sets it
  costs what it changes.
- per domainNames rule (`Rule.learned`) two sets `l4_<hash>` / `l6_<hash>` (`flags
  timeout`) that its line matches instead of its `peers`: declared when the rule appears,
  deleted when it goes, their elements never named by any render here -- only `learn`
  writes them, each with its timeout (agent/dataplane/nftlearn.py).
- names never reach the text: chains and sets are named by 128-bit hashes of the endpoint
  key and the rule key, rule comments carry the IR's `r:<Rule.id>` (read back by
  `counters`), and a chain's comment shows its endpoint's escaped, byte-capped display
  form (agent.dataplane.escape) for people only.

Per-packet cost is one hash lookup per direction plus the rules selecting that endpoint;
it does not grow with the number of pods or peers.

Cost of a change: the model (nftmodel.py) is built from the previous one and what changed
(`update`, with a `Memo` kept across syncs): only endpoints that are not the same
EndpointProgram object as last time (the incremental compiler hands unchanged ones back as
such) are walked and rendered again, shared sets are kept, refilled, renamed or dropped only
where a peer-set content came or went, and a changed set's elements are its previous ones
edited by the prefixes that moved; `build_model`, the full build, is the reference.
render_diff skips by identity what did not change and takes an edited set's element
changes from the edit. A diff that is nothing but element
adds and deletes in hash sets both models hold (the usual event: a remote pod's labels or
address) goes to the kernel as one raw nfnetlink batch (nfnetlink.py: one transaction, as
the text would be) instead of a libnftables command, whose fetch of every set of the table
first cost ~4 ms at 10k pods whatever the change; anything else goes as text. Loads: a first load into a kernel
without our table goes in bounded transactions (render_staged: sets, elements, endpoint
chains, then the maps and base chains that make the table judge), so its peak memory is
one batch's parse. A restart over the table a previous agent left (render_replace) stages
its new peer sets, named apart from the held ones, beside the old ones, then switches in
one transaction that rewrites every chain and deletes what is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from agent.dataplane import child, conntrack, heap, nfnetlink, nftcounters, nftlearn
from agent.dataplane.base import (
    ApplyStats,
    Count,
    Counters,
    Dataplane,
    DataplaneError,
    DropEvent,
    DropLog,
    Flow,
    LearnedEntry,
)
from agent.dataplane.escape import display
from agent.dataplane.nftmodel import (
    DENY_COMMENT,
    HOSTS,
    MAPS,
    NETS,  # noqa: F401  (re-exported: tests name it here)
    Memo,
    Model,
    Options,
    build_model,
    chain_name,
    tail_name,
    update,
)
from agent.ir import Direction, EndpointProgram, Program, Tier, Verdict

log = logging.getLogger(__name__)

TABLE = "stockade"
FAMILY = "inet"
UNKNOWN_COMMENT = "unknown-endpoint"
ND_TYPES = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect"
PREROUTING_PRIORITY = -150  # after conntrack (-200), before NAT and filter
COMMENT_MAX = 128  # bytes: nft refuses a longer comment (NFTNL_UDATA_COMMENT_MAXLEN)
CHUNK = 5000  # elements per command line; keeps single commands a sane size
# A staged first load (render_staged): set elements, and chains' rule lines, per transaction.
STAGE = 5000
STAGE_LINES = 500
BIG_LOAD = 1 << 20  # bytes of nft text above which a full load goes to an `nft -f` child
def _base_chains() -> str:
    def dispatch(directions: Iterable[str]) -> str:
        lines = []
        for d in directions:
            key = "saddr" if d == "egress" else "daddr"
            lines += [f"\t\tip {key} vmap @{d}4", f"\t\tip6 {key} vmap @{d}6"]
            # --unknown-endpoints=deny: a pod-CIDR address no source reported yet.
            lines += [f'\t\t{p} {key} @guard{v} {p} {key} != @known{v} counter drop comment "{UNKNOWN_COMMENT}"'
                      for p, v in (("ip", 4), ("ip6", 6))]
        return "\n".join(lines)

    common = (
        "\t\tct state established,related accept\n"
        f"\t\ticmpv6 type {{ {ND_TYPES} }} accept\n"
    )
    return (
        "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n"
        f"{common}{dispatch(['egress', 'ingress'])}\n\t}}\n"
        "\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n"
        f"{common}\t\tiif lo accept\n{dispatch(['egress', 'ingress'])}\n\t}}\n"
        # Endpoints behind a device (NetBird's wt0: the host itself is the endpoint) are judged
        # in prerouting, after conntrack: NetBird's client inserts "iifname wt0 accept" at the
        # top of every input and forward filter chain, which would bypass a rule there.
        f"\tchain prerouting {{\n\t\ttype filter hook prerouting priority {PREROUTING_PRIORITY}; "
        "policy accept;\n"
        f"{common}\t\tiif lo accept\n\t\tiifname vmap @ingress_if\n\t}}\n"
        "\tchain output {\n\t\ttype filter hook output priority filter; policy accept;\n"
        f"{common}\t\tip saddr vmap @egress4\n\t\tip6 saddr vmap @egress6\n\t\toifname vmap @egress_if\n\t}}\n"
    )


def _chain_comment(m: Model, chain: str) -> str:
    """A comment naming the chain's endpoint for people reading `nft list`; nothing parses
    it back (owners come from the model). Escaped and cut to nft's byte cap."""
    ep, d = m.owners[chain]
    return f'comment "{display(ep, COMMENT_MAX - len(d.value) - 1)} {d.value}"'


def _elements(elems: Iterable[str]) -> list[str]:
    items = sorted(elems)
    return [", ".join(items[i : i + CHUNK]) for i in range(0, len(items), CHUNK)]


def _set_decls(m: Model, names: Iterable[str] | None = None) -> list[str]:
    return [f"\tset {name} {{ type {m.sets[name][0]}; }}\n" for name in (sorted(m.sets) if names is None else names)]


def _learned_decls(m: Model, names: Iterable[str] | None = None) -> list[str]:
    """Declarations of learned-address sets (empty: `learn` fills them)."""
    return [f"\tset {name} {{ type {m.learned[name]}; }}\n"
            for name in (sorted(m.learned) if names is None else names)]


def _set_elements(m: Model, names: Iterable[str] | None = None) -> Iterator[tuple[int, str]]:
    """(element count, command) per chunk of the elements of every set (or of `names`), in
    set order. Elements go in separate commands so huge sets stay within sane line sizes."""
    for name in sorted(m.sets) if names is None else names:
        items = sorted(m.sets[name][1])
        for i in range(0, len(items), CHUNK):
            chunk = items[i : i + CHUNK]
            yield len(chunk), f"add element {FAMILY} {TABLE} {name} {{ {', '.join(chunk)} }}\n"


def _chain_blocks(m: Model, names: Iterable[str]) -> Iterator[str]:
    for name in names:
        comment = f"\t\t{_chain_comment(m, name)}\n"
        body = "".join(f"\t\t{r}\n" for r in m.chains[name])
        yield f"\tchain {name} {{\n{comment}{body}\t}}\n"


def _map_elements(m: Model) -> str:
    return "".join(f"add element {FAMILY} {TABLE} {name} {{ {chunk} }}\n"
                   for name, entries in m.maps.items()
                   for chunk in _elements(f"{k} : {v}" for k, v in entries.items()))


def _dispatch(m: Model, sets: bool, chains: bool) -> str:
    """The table block with its maps and base chains (what makes it judge packets), and the
    set declarations and endpoint chains when asked; then the maps' elements."""
    out = [f"table {FAMILY} {TABLE} {{\n"]
    out += [f"\tmap {name} {{ type {typ} : verdict; }}\n" for name, typ in MAPS.items()]
    if sets:
        out += _set_decls(m) + _learned_decls(m)
    if chains:
        out += _chain_blocks(m, sorted(m.chains))
    out.append(_base_chains() + "}\n")
    return "".join(out)


def render_full(m: Model) -> str:
    """The whole table as one text (one transaction)."""
    return _dispatch(m, sets=True, chains=True) + "".join(c for _, c in _set_elements(m)) + _map_elements(m)


def render_staged(m: Model, elements: int = STAGE, lines: int = STAGE_LINES) -> Iterator[str]:
    """A first load into a kernel without our table, as several transactions (see
    NftablesDataplane._load_fresh): the table with its set declarations; the sets' elements,
    about `elements` a time; the endpoint chains, about `lines` rule lines a time; last the
    maps and base chains. No packet meets the table before the last one: until then no base
    chain hooks it, and chains and sets nothing reaches judge nothing. Each transaction is a
    bounded text, so a load's peak is one batch's parse, not the whole ruleset's."""
    yield f"table {FAMILY} {TABLE} {{\n" + "".join(_set_decls(m) + _learned_decls(m)) + "}\n"
    yield from _element_batches(m, sorted(m.sets), elements)
    batch: list[str] = []
    n = 0
    for name in sorted(m.chains):
        # A tail chain (in_x_t) sorts right after its head and goes in the head's batch.
        if batch and n >= lines and not name.endswith("_t"):
            yield f"table {FAMILY} {TABLE} {{\n" + "".join(_chain_blocks(m, batch)) + "}\n"
            batch, n = [], 0
        batch.append(name)
        n += len(m.chains[name]) + 1
    if batch:
        yield f"table {FAMILY} {TABLE} {{\n" + "".join(_chain_blocks(m, batch)) + "}\n"
    yield _dispatch(m, sets=False, chains=False) + _map_elements(m)


def _element_batches(m: Model, names: list[str], elements: int) -> Iterator[str]:
    part: list[str] = []
    n = 0
    for count, cmd in _set_elements(m, names):
        if part and n + count > elements:
            yield "".join(part)
            part, n = [], 0
        part.append(cmd)
        n += count
    if part:
        yield "".join(part)


BASE_CHAINS = ("forward", "input", "prerouting", "output")


def render_replace(m: Model, held_sets: frozenset[str], held_chains: frozenset[str],
                   elements: int = STAGE) -> Iterator[str]:
    """A restart over the table a previous agent left (its set and chain names: `held_*`),
    `m` built with peer-set names that avoid the held ones (build_model's `avoid`). First the
    new peer sets, declared and filled about `elements` at a time beside the old ones: no
    rule refers to them, so they judge nothing. Then ONE transaction flushes every held
    chain, refills the maps and the sets both tables name (guard, known), writes every
    chain of `m` (base chains included) and deletes the chains and sets `m` has not:
    packets see the old rules or the new ones, and the bulk of the text (set elements)
    never sits in one parse."""
    t = f"{FAMILY} {TABLE}"
    fresh = [n for n in sorted(m.sets) if n not in held_sets]
    kept = sorted(set(m.sets) & held_sets)
    # Learned sets the old table holds stay as they are, elements and all (never flushed).
    learned = [n for n in sorted(m.learned) if n not in held_sets]
    if fresh or learned:
        yield f"table {FAMILY} {TABLE} {{\n" + "".join(_set_decls(m, fresh) + _learned_decls(m, learned)) + "}\n"
        yield from _element_batches(m, fresh, elements)
    cmds = [c for n in kept for c in (f"add set {t} {n} {{ type {m.sets[n][0]}; }}", f"flush set {t} {n}")]
    cmds += [c for n, typ in MAPS.items()
             for c in (f"add map {t} {n} {{ type {typ} : verdict; }}", f"flush map {t} {n}")]
    cmds += [f"flush chain {t} {c}" for c in sorted(held_chains)]
    cmds += [f"add chain {t} {c}" for c in sorted(set(m.chains) - held_chains)]  # a goto target exists first
    text = "".join(c + "\n" for c in cmds) + _dispatch(m, sets=False, chains=True)
    text += "".join(c for _, c in _set_elements(m, kept)) + _map_elements(m)
    text += "".join(f"delete chain {t} {c}\n" for c in sorted(held_chains - set(m.chains) - set(BASE_CHAINS)))
    text += "".join(f"delete set {t} {n}\n" for n in sorted(held_sets - set(m.sets) - set(m.learned)))
    yield text


# A hash set's element changes: (set, address family, deleted, added), element texts.
ElementDelta = tuple[str, int, frozenset[str], frozenset[str]]
_HOST_FAMILY = {typ: fam for fam, typ in HOSTS.items()}


@dataclass(frozen=True)
class Diff:
    """What takes the kernel from one model to the next: nft text (one transaction), and,
    when that text is nothing but element adds and deletes in hash sets both models hold
    (the usual event: a remote pod's labels or address), the same changes as data, which
    `NftablesDataplane.apply` sends as one raw nfnetlink batch instead (nfnetlink.py)."""

    text: str
    stats: ApplyStats
    elements: tuple[ElementDelta, ...] | None  # None: the text holds more than that


def render_diff(old: Model, new: Model) -> tuple[str, ApplyStats]:
    """Commands taking the kernel from `old` to `new`, ordered so references stay valid."""
    d = diff(old, new)
    return d.text, d.stats


def diff(old: Model, new: Model) -> Diff:
    """The diff from `old` to `new`: its text (see render_diff) and, when it only changes
    elements of hash sets both hold, those changes (Diff.elements)."""
    t = f"{FAMILY} {TABLE}"
    cmds: list[str] = []
    deltas: list[ElementDelta] = []
    other = 0  # commands that are not element changes of a held hash set
    added = removed = 0
    for name, (typ, elems) in sorted(new.sets.items()):
        if name not in old.sets:
            cmds.append(f"add set {t} {name} {{ type {typ}; }}")
            other += 1
            gone, fresh = frozenset[str](), elems
        elif old.sets[name][1] is elems:
            continue  # the same object (an unchanged peer set): nothing to compare
        elif (edit := new.edits.get(id(elems))) is not None and edit[0] is elems and edit[1] is old.sets[name][1]:
            # edited from what old holds (nftmodel.update): elems = (held - rm) | add
            _, held, rm, add = edit
            gone, fresh = rm - add, frozenset(e for e in add if e not in held)
        else:
            gone, fresh = old.sets[name][1] - elems, elems - old.sets[name][1]
        # Deletes first: an interval set refuses an overlapping add.
        more = [f"delete element {t} {name} {{ {c} }}" for c in _elements(gone)]
        more += [f"add element {t} {name} {{ {c} }}" for c in _elements(fresh)]
        cmds += more
        fam = _HOST_FAMILY.get(typ)
        if fam is not None and name in old.sets and old.sets[name][0] == typ:
            if gone or fresh:
                deltas.append((name, fam, gone, fresh))
        else:
            other += len(more)
        added, removed = added + len(fresh), removed + len(gone)
    # Learned sets: declared when their rule appears, deleted (below) when it goes, their
    # elements never touched here (only `learn` writes them).
    set_cmds = len(cmds)
    cmds += [f"add set {t} {name} {{ type {typ}; }}" for name, typ in sorted(new.learned.items())
             if name not in old.learned]
    written = 0
    # New chains first, empty: a rule may `goto` a chain that sorts after it (in_x -> in_x_t).
    cmds += [f"add chain {t} {name} {{ {_chain_comment(new, name)}; }}"
             for name in sorted(set(new.chains) - set(old.chains))]
    for name, rules in sorted(new.chains.items()):
        was = old.chains.get(name)
        if was is rules or was == rules:  # `is`: a reused endpoint's chains (build_model's memo)
            continue
        written += 1
        if name in old.chains:
            cmds.append(f"flush chain {t} {name}")
        cmds += [f"add rule {t} {name} {r}" for r in rules]
    for mname in MAPS:
        o, n = old.maps[mname], new.maps[mname]
        gone_keys = [k for k in o if n.get(k) != o[k]]
        new_keys = [k for k in n if o.get(k) != n[k]]
        cmds += [f"delete element {t} {mname} {{ {c} }}" for c in _elements(gone_keys)]
        cmds += [
            f"add element {t} {mname} {{ {c} }}"
            for c in _elements(f"{k} : {n[k]}" for k in new_keys)
        ]
    gone = sorted(set(old.chains) - set(new.chains))
    # Flush every chain before deleting any: a removed chain may `goto` another removed one.
    cmds += [f"flush chain {t} {name}" for name in gone] + [f"delete chain {t} {name}" for name in gone]
    for name in sorted(set(old.sets) - set(new.sets)):
        cmds.append(f"delete set {t} {name}")
    cmds += [f"delete set {t} {name}" for name in sorted(set(old.learned) - set(new.learned))]
    other += len(cmds) - set_cmds
    stats = ApplyStats(False, len(cmds), added, removed, written)
    return Diff("".join(c + "\n" for c in cmds), stats, None if other else tuple(deltas))


def element_ops(deltas: Iterable[ElementDelta]) -> list[nfnetlink.Op]:
    """Element changes as nfnetlink operations, in the text's order: every set's deletes,
    then every set's adds, each set's elements sorted (a hash set's are independent: the
    order is for reproducibility, not for the kernel)."""
    deltas = list(deltas)
    ops: list[nfnetlink.Op] = []
    for kind, pick in ((nfnetlink.NFT_MSG_DELSETELEM, 2), (nfnetlink.NFT_MSG_NEWSETELEM, 3)):
        for delta in deltas:
            af = socket.AF_INET if delta[1] == 4 else socket.AF_INET6
            ops += [(kind, delta[0], nfnetlink.element(socket.inet_pton(af, e))) for e in sorted(delta[pick])]
    return ops


class NftablesDataplane(Dataplane):
    name = "nftables"
    learns_in_kernel = True  # learned-address sets with per-element timeouts (nftlearn.py)

    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self._nft = None
        self._model: Model | None = None  # what the kernel holds after our last apply
        self._program: Program | None = None  # the program that model came from
        self._memo = Memo()  # what each endpoint gave the last build (see build_model)
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._sets = nftlearn.NetlinkSets(FAMILY, TABLE)  # learned-address elements (`learn`)
        self._elements = nfnetlink.SetElements(FAMILY, TABLE)  # element-only diffs (apply)
        self._learn_lock = threading.Lock()

    @property
    def nft(self):  # type: ignore[no-untyped-def]
        if self._nft is None:
            self._nft = self._context()
        return self._nft

    @staticmethod
    def _context():  # type: ignore[no-untyped-def]
        try:
            import nftables
        except ImportError as e:
            raise DataplaneError(
                "the nftables Python bindings are missing: install Debian's python3-nftables "
                "and run from a venv created with --system-site-packages (make setup does this)"
            ) from e
        ctx = nftables.Nftables()
        ctx.set_handle_output(False)
        return ctx

    def _run(self, text: str, json_out: bool = False, read: bool = False) -> str:
        """One libnftables command. Reads (`list tables`; `list table` for the reference
        counter reader, ~0.1 s at 10k pods) have a context of their own, so a sync never
        waits behind one: a context is not shared between threads, and the kernel orders a
        read against a commit by itself. A fresh one per read: a context keeps the cache it
        fetched for as long as it lives (a kept reader held the agent ~25 MB higher at 10k
        pods after the first `list table`)."""
        if read:
            with self._read_lock:
                reader = self._context()
                try:
                    return self._cmd(reader, text, json_out)
                finally:
                    del reader
        with self._lock:
            return self._cmd(self.nft, text, json_out)

    @staticmethod
    def _cmd(ctx, text: str, json_out: bool) -> str:  # type: ignore[no-untyped-def]
        ctx.set_json_output(json_out)
        ctx.set_terse_output(json_out)
        rc, out, err = ctx.cmd(text)
        if rc != 0:
            raise DataplaneError(f"nft refused the transaction: {err.strip()}")
        return str(out)

    def _send_elements(self, deltas: tuple[ElementDelta, ...]) -> bool:
        """Element changes of held hash sets as ONE raw nfnetlink batch (one transaction, as
        the text would be): no libnftables cache fetch, which costs ~4 ms at 10k pods
        whatever the change. False (nothing sent) when the batch is too big for one send:
        the caller sends the text instead. libnftables keeps no cache across commands that
        this could make stale: each command checks the ruleset's generation first."""
        if not deltas:
            return True
        ops = element_ops(deltas)
        with self._lock:
            try:
                self._elements.transaction(ops)
            except nfnetlink.TooLarge:
                return False
            except OSError as e:
                raise DataplaneError(f"nft refused the transaction: {e.strerror or e}") from e
        return True

    def _run_child(self, text: str) -> None:
        """A big load through an `nft -f` child: libnftables keeps most of the memory a load
        needs, and the agent should not (one transaction all the same). The child reads a
        complete file, never a pipe an agent killed mid-write would cut at a line end (nft
        would commit the part it got), and dies with the agent (see child.py)."""
        nft = shutil.which("nft")
        if nft is None:
            raise DataplaneError("the `nft` command is missing: install Debian's nftables package")
        with tempfile.NamedTemporaryFile("w", prefix="stockade-", suffix=".nft") as f:
            f.write(text)
            f.flush()
            res = child.run([nft, "-f", f.name], capture_output=True, text=True)
        if res.returncode != 0:
            raise DataplaneError(f"nft refused the transaction: {res.stderr.strip()[:2000]}")

    def render(self, program: Program) -> str:
        return render_full(build_model(program, self.options))

    def apply(self, program: Program) -> ApplyStats:
        if self._model is not None:
            new = update(program, self.options, self._model, self._memo)
            d = diff(self._model, new)
            new.edits = {}  # they hold the sets they were edited from: only this diff needs them
            try:
                sent = d.elements is not None and self._send_elements(d.elements)
                if not sent and d.text:
                    self._run(d.text)
                self._model, self._program = new, program
                return d.stats
            except DataplaneError:
                if self._has_table():
                    raise
                log.warning("the stockade table vanished; rebuilding it")
        else:  # a cold load: its peak sits on whatever the compile left
            # (free pages only: a snapshot leaves no cyclic garbage -- 0 unreachable at 10k --
            # and a collection here walked its whole heap, 0.17-0.4 s of a cold start)
            heap.release()
        held_sets, held_chains = self._held()
        if not held_sets and not held_chains:
            new = update(program, self.options, None, self._memo)
            lines = self._load_fresh(new)
        else:
            # A table a previous agent left (a restart): new peer sets take names it does not use.
            avoid = frozenset(n.rsplit("_", 1)[0] for n in held_sets if n.startswith("p_"))
            new = update(program, self.options, None, self._memo, avoid)
            lines = self._replace(new, held_sets, held_chains)
        self._model, self._program = new, program
        return ApplyStats(True, lines, sum(len(s[1]) for s in new.sets.values()))

    def _held(self) -> tuple[frozenset[str], frozenset[str]]:
        """Names of the sets and chains our table holds in the kernel (none: no table)."""
        out = []
        for what in ("sets", "chains"):
            text = self._run(f"list {what} {FAMILY}", json_out=True)
            objs = json.loads(text)["nftables"] if text.strip() else []
            kind = what[:-1]
            out.append(frozenset(o[kind]["name"] for o in objs if kind in o and o[kind].get("table") == TABLE))
        return out[0], out[1]

    def _replace(self, m: Model, held_sets: frozenset[str], held_chains: frozenset[str]) -> int:
        """The table a previous agent left replaced by `m` (render_replace: new sets staged
        beside the old ones, then one transaction). Should that fail (say a table of another
        layout), the whole table is replaced in one transaction as a last resort."""
        lines = 0
        heap.release()
        try:
            for text in render_replace(m, held_sets, held_chains):
                lines += text.count("\n")
                self._load(text)
                heap.release()
            return lines
        except DataplaneError as e:
            log.warning("replacing the stockade table in place failed (%s); replacing it whole", e)
        text = f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n" + render_full(m)
        self._load(text)
        return text.count("\n")

    def _load(self, text: str) -> None:
        if len(text) > BIG_LOAD:
            self._run_child(text)
        else:
            self._run(text)

    def _load_fresh(self, m: Model) -> int:
        """A load into a kernel without our table (first start, or the table vanished) in
        several bounded transactions (render_staged): nothing is enforced before, so there
        is nothing to keep, and the table judges no packet before its last transaction.
        Peak memory is one batch's parse instead of the whole ruleset's. If a step fails,
        the partial table (sets only) is removed; the next sync starts afresh."""
        lines = 0
        heap.release()
        try:
            for text in render_staged(m):
                lines += text.count("\n")
                self._load(text)
                heap.release()  # what libnftables freed after a batch, so batches reuse no more than one's worth
        except DataplaneError:
            with contextlib.suppress(DataplaneError):  # else the next sync replaces what is left
                self._run(f"delete table {FAMILY} {TABLE}")
            raise
        return lines

    def _has_table(self) -> bool:
        out = self._run("list tables", json_out=True, read=True)
        return any(
            o.get("table", {}).get("name") == TABLE and o["table"].get("family") == FAMILY
            for o in json.loads(out)["nftables"]
        )

    def counters(self, program: Program | None = None) -> Counters:
        """Read every rule counter of our table. Chains are named after their endpoint's
        hash, so `program` (or the last applied one) maps them back to endpoints. One raw
        NFT_MSG_GETRULE dump, streamed (nftcounters.py): no libnftables cache of the whole
        table, no JSON of it; `counters_libnftables` is the reference it must equal."""
        owners = self._owners(program)
        if owners is None:
            return Counters()

        def add(c: Counters, r: nftcounters.Rule) -> None:
            _count(c, owners[r[0]], Count(r[1], r[2]), r[3])

        try:
            return nftcounters.read(FAMILY, TABLE, owners.__contains__, Counters, add)
        except OSError as e:
            raise DataplaneError(f"reading the rule counters of table {FAMILY} {TABLE}: {e}") from e

    def counters_libnftables(self, program: Program | None = None) -> Counters:
        """`counters` by one libnftables `list table` as JSON: each costs a fetch of the
        whole table's state (every set's elements included) and a parse of all of it.
        Kept as the reference the raw dump is tested against."""
        owners = self._owners(program)
        c = Counters()
        if owners is None:
            return c
        try:
            objs = json.loads(self._run(f"list table {FAMILY} {TABLE}", json_out=True, read=True))["nftables"]
        except DataplaneError:
            if self._has_table():
                raise
            return c  # nothing programmed (yet, or any more)
        for obj in objs:
            rule = obj.get("rule")
            if not rule or rule.get("chain") not in owners:
                continue
            count = next((e["counter"] for e in rule["expr"] if "counter" in e), None)
            if count is not None:
                _count(c, owners[rule["chain"]], Count(count["packets"], count["bytes"]), rule.get("comment", ""))
        return c

    def _owners(self, program: Program | None) -> dict[str, tuple[str, Direction]] | None:
        """Chain -> (endpoint, direction) for `program` (None: nothing applied, no program)."""
        if self._model is not None and (program is None or program is self._program):
            return self._model.owners  # the usual scrape: no need to rebuild the model
        if program is not None:
            return build_model(program, self.options).owners
        return None

    def learn(self, add: Sequence[LearnedEntry], remove: Sequence[LearnedEntry] = ()) -> None:
        """One transaction adding (or re-timing) and removing learned addresses in the sets
        of the rules the kernel holds now; nothing else in the table changes."""
        m = self._model
        if m is None or not m.learned:
            return
        with self._learn_lock:
            try:  # raw nfnetlink, not libnftables: no fetch of the table's cache first
                self._sets.learn(m.learned, add, remove, time.monotonic())
            except OSError as e:
                raise DataplaneError(f"learned addresses: {e}") from e

    def established(self) -> list[Flow]:
        return conntrack.established()

    def forget(self, flows: list[Flow]) -> int:
        return conntrack.forget(flows)

    def drop_log(self) -> DropLog | None:
        if self.options.log_group is None:
            return None
        return _NftDropLog(self, self.options.log_group)

    def owner(self, chain: str) -> tuple[str, Direction] | None:
        return self._model.owners.get(chain) if self._model else None

    def objects(self) -> dict[str, int]:
        m = self._model or Model()
        return {
            "sets": len(m.sets),
            "set_elements": sum(len(e) for _, e in m.sets.values()),
            "chains": len(m.chains),
            "rules": sum(len(r) for r in m.chains.values()),
            "map_elements": sum(len(v) for v in m.maps.values()),
        }

    def cleanup(self) -> None:
        if self._has_table():
            self._run(f"delete table {FAMILY} {TABLE}")
        self._model = None
        self._elements.close()


def _count(c: Counters, owner: tuple[str, Direction], n: Count, comment: str) -> None:
    """One rule's counter into `c`: a default deny's, or an IR rule's by its `r:<id>` comment."""
    ep, d = owner
    if comment == DENY_COMMENT:
        c.add_drop((ep, d), n)
    elif comment.startswith("r:"):
        c.add_rule((ep, comment[2:], d), n)


def endpoint_chains(ep: EndpointProgram) -> list[str]:
    """Names of the chains programmed for an endpoint (for diagnostics), tail chains included."""
    out = []
    for d in Direction:
        dp = ep.direction(d)
        if dp.enforced:
            out.append(chain_name(ep.key, d))
            if any(r.tier is Tier.ADMIN and r.verdict is Verdict.PASS for r in dp.rules):
                out.append(tail_name(out[-1]))
    return out


class _NftDropLog(DropLog):
    """Sampled drops from the table's NFLOG group, mapped back to endpoints and rules."""

    def __init__(self, dp: NftablesDataplane, group: int) -> None:
        from agent.dataplane.nflog import NflogReader

        self.dp = dp
        self.reader = NflogReader(group)

    def read(self, timeout: float) -> list[DropEvent]:
        out = []
        for pkt in self.reader.read(timeout):
            parts = pkt.prefix.split()
            if len(parts) != 4 or parts[0] != "stk":
                continue
            owner = self.dp.owner(parts[2])
            if owner is None:
                continue
            rule_id = parts[3][2:] if parts[3].startswith("r:") else None
            out.append(DropEvent(owner[0], owner[1], rule_id, pkt.protocol, pkt.src, pkt.dst,
                                 pkt.sport, pkt.dport, audit=parts[1] == "A"))
        return out

    def close(self) -> None:
        self.reader.close()
