"""Learned addresses (DNS egress `domainNames` rules) in nftables sets with per-element
timeouts: the set names and declarations the renderer uses, and the element updates
`NftablesDataplane.learn` sends.

Each `Rule.learned` rule of an endpoint's chain matches against two sets of its own,
`l4_<hash>` / `l6_<hash>` (128-bit hash of the IR rule key, never user text), declared
`flags timeout`. The renderer declares them when the rule appears and deletes them when it
goes; no diff, reload or restart ever touches their elements (they are not in
`Model.sets`). Only `learn` writes elements: each with `timeout <ms left>`, so the kernel
forgets it at its expiry with no re-render.

On this kernel (6.18) adding an element that is already in the set replaces its timeout
(later or sooner), so a refresh is a plain add. Removing one the kernel may already have
timed out is `add` then `delete` in one transaction: a plain delete of an absent element
fails the whole transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

from agent.dataplane import nfnetlink
from agent.dataplane.base import LearnedEntry
from agent.ir import IPAddress, Rule

LEARNED_TYPES = {4: "ipv4_addr; flags timeout", 6: "ipv6_addr; flags timeout"}
_PREFIX = {4: "l4_", 6: "l6_"}


def set_name(rule_key: str, fam: int) -> str:
    """The learned set of IR rule `rule_key` for one address family. 128 bits, as for
    every other name in the table: rule keys carry attacker-chosen names."""
    digest = hashlib.blake2s(rule_key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return f"{_PREFIX[fam]}{digest}"


def rule_sets(rule: Rule) -> dict[str, str]:
    """Set name -> nft type declaration of a learned rule's two sets."""
    return {set_name(rule.key, fam): LEARNED_TYPES[fam] for fam in (4, 6)}


def peer_matches(rule: Rule, peer_key: str) -> list[str]:
    """The peer clauses of a learned rule: its own sets, one line per family."""
    return [f"{proto} {peer_key} @{set_name(rule.key, fam)} " for fam, proto in ((4, "ip"), (6, "ip6"))]


def timeout_ms(expires: float, now: float) -> int:
    """Milliseconds left until `expires` (both time.monotonic()), rounded up: 0 means gone."""
    left = expires - now
    return 0 if left <= 0 else max(1, int(left * 1000 + 0.999))


def element_commands(table: str, held: Mapping[str, str] | Iterable[str], add: Sequence[LearnedEntry],
                     remove: Sequence[LearnedEntry], now: float) -> str:
    """nft text for one `learn` transaction: removals (add then delete, so an element the
    kernel already timed out is no error), then additions with their timeouts. Entries of
    rules whose sets `held` does not name, and additions already expired, are left out."""
    held = set(held)
    cmds = []
    for e in remove:
        name = set_name(e.rule, e.address.version)
        if name in held:
            elem = f"{table} {name} {{ {e.address} }}"
            cmds += [f"add element {elem}", f"delete element {elem}"]
    for e in add:
        name = set_name(e.rule, e.address.version)
        ms = timeout_ms(e.expires, now)
        if name in held and ms:
            cmds.append(f"add element {table} {name} {{ {e.address} timeout {ms}ms }}")
    return "".join(c + "\n" for c in cmds)


# ---------------------------------------------------------------- raw nfnetlink
#
# libnftables fetches the table's cache (sets, chains) before an `add element`: ~3 ms at
# 10k pods for one element. The same transaction as an NFNL batch (agent/dataplane/
# nfnetlink.py, the encoder the peer-set diffs share) costs what it carries.
# `element_commands` stays the reference (tests/unit/test_nft_learn.py compares the two in
# a kernel).

BATCH_BYTES = 64 * 1024  # one batch (one transaction) at most: a `learn` is far smaller


def _element(address: IPAddress, ms: int | None) -> bytes:
    return nfnetlink.element(address.packed, ms)


class NetlinkSets(nfnetlink.SetElements):
    """`learn` transactions of one nft table (see nfnetlink.SetElements)."""

    def learn(self, held: Mapping[str, str] | Iterable[str], add: Sequence[LearnedEntry],
              remove: Sequence[LearnedEntry], now: float) -> None:
        """What `element_commands` says, as nfnetlink batches (one unless very large).
        Raises OSError (errno from the kernel: the batch is not committed)."""
        held = set(held)
        ops: list[nfnetlink.Op] = []  # (message type, set, one element), in order
        gone: list[tuple[str, bytes]] = []
        for e in remove:
            name = set_name(e.rule, e.address.version)
            if name in held:
                gone.append((name, _element(e.address, None)))
        for name, elem in gone:  # each twice: an element the kernel timed out is no error
            ops.append((nfnetlink.NFT_MSG_NEWSETELEM, name, elem))
        ops += [(nfnetlink.NFT_MSG_DELSETELEM, name, elem) for name, elem in gone]
        for e in add:
            name = set_name(e.rule, e.address.version)
            ms = timeout_ms(e.expires, now)
            if name in held and ms:
                ops.append((nfnetlink.NFT_MSG_NEWSETELEM, name, _element(e.address, ms)))
        if gone and sum(len(x[2]) for x in ops) > BATCH_BYTES:
            self.transaction(ops)  # removals and adds must share a transaction: one big batch
            return
        part: list[nfnetlink.Op] = []
        size = 0
        for op in ops:
            if part and size + len(op[2]) > BATCH_BYTES:
                self.transaction(part)
                part, size = [], 0
            part.append(op)
            size += len(op[2])
        if part:
            self.transaction(part)
