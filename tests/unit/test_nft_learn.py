"""domainNames rules on nftables: each matches two learned-address sets of its own
(`flags timeout`), which every diff, reload and restart keeps with their elements while the
rule exists, and `learn` fills by raw nfnetlink (compared with libnftables' text, the
reference). Rendering is checked as text; the kernel side in throwaway network namespaces."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataplane import nftlearn
from agent.dataplane.base import LearnedEntry
from agent.dataplane.nftables import (
    FAMILY,
    TABLE,
    NftablesDataplane,
    build_model,
    render_diff,
    render_full,
    render_replace,
    render_staged,
)
from agent.ir import Program
from tests.kit.builders import BASE, pod, snapshot_of
from tests.kit.netns import inside
from tests.kit.nftns import nft_file, nft_json, throwaway_netns

WEB, API = "10.0.0.1", "10.0.0.2"  # BASE: a/web, a/api (team=red: the subjects)


def cnp(name: str, patterns: list[str], port: int = 443, deny_first: bool = False) -> dict:
    egress = [{"action": "Accept", "to": [{"domainNames": patterns}],
               "protocols": [{"tcp": {"destinationPort": {"number": port}}}]}]
    if deny_first:
        egress.insert(0, {"action": "Deny", "to": [{"networks": ["192.0.2.66/32"]}]})
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchLabels": {"team": "red"}}},
                     "egress": egress}}


def program(*docs: dict) -> Program:
    return snapshot_of([*BASE, *docs]).program


def learned_rules(prog: Program) -> list[str]:
    return sorted(r.key for ep in prog.endpoints.values() for r in ep.egress.rules if r.learned)


LEARNED_NAME = re.compile(r"\bl[46]_[0-9a-f]{32}\b")
SET_COMMAND = re.compile(r"(?<!@)\bl[46]_[0-9a-f]{32}\b")  # the set itself named, not a rule matching it


def test_a_learned_rule_matches_its_own_timeout_sets_at_its_place() -> None:
    prog = program(cnp("names", ["*.example.test"], deny_first=True))
    m = build_model(prog)
    keys = learned_rules(prog)
    assert len(keys) == 2  # a/web and a/api
    assert m.learned == {nftlearn.set_name(k, f): nftlearn.LEARNED_TYPES[f] for k in keys for f in (4, 6)}
    assert not any(n.startswith(("l4_", "l6_")) for n in m.sets)  # elements never in the model
    web = build_model(prog).chains[next(c for c, o in m.owners.items() if o[0] == "a/web")]
    deny = next(i for i, line in enumerate(web) if "drop" in line)
    allow = [i for i, line in enumerate(web) if LEARNED_NAME.search(line)]
    assert len(allow) == 2 and deny < min(allow)  # the Deny before it still decides first
    assert all("th dport 443" in web[i] and "return" in web[i] for i in allow)
    text = render_full(m)
    assert "flags timeout" in text and not re.search(r"add element \S+ \S+ l[46]_", text)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.integers(0, 3)), min_size=2, max_size=6))
def test_render_diff_never_touches_the_elements_of_a_learned_set(steps: list[tuple[bool, bool, int]]) -> None:
    """Whatever else changes between two programs (rules coming and going, ports, pods), a
    learned set is added when its rule appears, deleted when it goes, and otherwise never
    named by a diff; its elements are never named at all."""
    def prog(names: bool, other: bool, extra: int) -> Program:
        docs = [cnp("names", ["*.example.test"], port=443 + extra % 2)] if names else []
        if other:
            docs.append(cnp("other", ["api.example.test"], deny_first=extra > 1))
        docs += [pod(f"a/p{i}", f"10.0.0.{10 + i}", {"app": "p"}) for i in range(extra)]
        return program(*docs)

    old = build_model(prog(*steps[0]))
    for step in steps[1:]:
        new = build_model(prog(*step), prev=old)
        text, _ = render_diff(old, new)
        for line in text.splitlines():
            names = SET_COMMAND.findall(line)
            if not names:
                continue
            assert line.split()[:2] in (["add", "set"], ["delete", "set"]), line
            (name,) = names
            if line.startswith("add set"):
                assert name in new.learned and name not in old.learned, line
            else:
                assert name in old.learned and name not in new.learned, line
        old = new


def _elements(ns: str, name: str) -> dict[str, int]:
    """address -> timeout (whole seconds, as nft's JSON shows it; 0: none) of one set."""
    out = {}
    for obj in nft_json(ns, "set", FAMILY, TABLE, name):
        for e in obj.get("set", {}).get("elem", []):
            out.update({e: 0} if isinstance(e, str) else {e["elem"]["val"]: e["elem"].get("timeout", 0)})
    return out


def _entry(key: str, ip: str, seconds: float) -> LearnedEntry:
    return LearnedEntry(key, ipaddress.ip_address(ip), time.monotonic() + seconds)


def test_learned_elements_survive_diffs_reloads_and_restarts_and_go_with_their_rule() -> None:
    names, other = cnp("names", ["*.example.test"]), cnp("other", ["api.example.test"], port=80)
    with throwaway_netns("lrn") as ns, inside(ns):
        dp = NftablesDataplane()
        dp.apply(program(names))
        key = learned_rules(program(names))[0]
        s4, s6 = nftlearn.set_name(key, 4), nftlearn.set_name(key, 6)
        dp.learn([_entry(key, "192.0.2.7", 300), _entry(key, "2001:db8::7", 300),
                  _entry(key, "192.0.2.8", -1),  # already expired: skipped
                  _entry("no/such/domains@rule", "192.0.2.9", 300)])  # not a rule the kernel holds
        assert set(_elements(ns, s4)) == {"192.0.2.7"} and set(_elements(ns, s6)) == {"2001:db8::7"}
        dp.apply(program(names, other, pod("a/new", "10.0.0.30")))  # a diff: more rules, sets, a pod
        dp.apply(program(names))  # and back
        assert set(_elements(ns, s4)) == {"192.0.2.7"}
        again = NftablesDataplane()  # an agent restart over the table left behind (render_replace)
        again.apply(program(names, other))
        assert set(_elements(ns, s4)) == {"192.0.2.7"} and set(_elements(ns, s6)) == {"2001:db8::7"}
        again.apply(program(other))  # the rule goes: its sets go
        left = {o["set"]["name"] for o in nft_json(ns, "sets", FAMILY) if "set" in o}
        assert s4 not in left and s6 not in left
        again.apply(program(names, other))  # back: fresh, empty sets
        assert _elements(ns, s4) == {}


def test_staged_and_replace_loads_declare_learned_sets_and_never_flush_held_ones() -> None:
    m = build_model(program(cnp("names", ["*.example.test"])))
    staged = "".join(render_staged(m))
    assert all(f"set {n} {{ type {t}; }}" in staged for n, t in m.learned.items())
    held = frozenset(m.learned) | {"p_gone_4"}
    text = "".join(render_replace(m, held, frozenset()))
    assert not any(SET_COMMAND.search(line) for line in text.splitlines()), "held learned sets left as they are"
    assert "delete set inet stockade p_gone_4" in text


def test_refresh_replaces_the_timeout_and_removing_an_absent_element_is_no_error() -> None:
    """This kernel replaces an element's timeout when it is added again (later or sooner):
    a refresh is a plain add. A removal is add + delete: no error for an element gone."""
    with throwaway_netns("lrr") as ns, inside(ns):
        dp = NftablesDataplane()
        dp.apply(program(cnp("names", ["*.example.test"])))
        key = learned_rules(program(cnp("names", ["*.example.test"])))[0]
        s4 = nftlearn.set_name(key, 4)
        dp.learn([_entry(key, "192.0.2.7", 30)])
        dp.learn([_entry(key, "192.0.2.7", 500)])
        assert 490 <= _elements(ns, s4)["192.0.2.7"] <= 500
        dp.learn([_entry(key, "192.0.2.8", 100)], [_entry(key, "192.0.2.7", 0), _entry(key, "192.0.2.99", 0)])
        assert set(_elements(ns, s4)) == {"192.0.2.8"}


@pytest.mark.parametrize("batch", [1, 3, 700])
def test_netlink_batches_leave_what_libnftables_text_leaves(batch: int) -> None:
    """The raw nfnetlink batch and libnftables' `element_commands` (the reference), given
    the same entries, leave the same elements and timeouts in two copies of one table."""
    prog = program(cnp("names", ["*.example.test"]))
    m = build_model(prog)
    key = learned_rules(prog)[0]
    now = time.monotonic()
    add = [LearnedEntry(key, ipaddress.ip_address(f"198.18.{i // 250}.{i % 250 + 1}"), now + 100 + i)
           for i in range(batch)] + [LearnedEntry(key, ipaddress.ip_address(f"2001:db8::{i + 1:x}"), now + 50)
                                     for i in range(batch)]
    seed = [LearnedEntry(key, ipaddress.ip_address("198.19.0.1"), now + 60)]
    remove = [LearnedEntry(key, ipaddress.ip_address(ip), 0.0) for ip in ("198.19.0.1", "198.19.0.2")]
    with throwaway_netns("lnA") as a, throwaway_netns("lnB") as b:
        for ns in (a, b):
            nft_file(ns, render_full(m))
            nft_file(ns, nftlearn.element_commands(f"{FAMILY} {TABLE}", m.learned, add[:1] + seed, [], now))
        nft_file(a, nftlearn.element_commands(f"{FAMILY} {TABLE}", m.learned, add, remove, now))
        with inside(b):
            sets = nftlearn.NetlinkSets(FAMILY, TABLE)
            sets.learn(m.learned, add, remove, now)
            sets.close()
        for fam in (4, 6):
            name = nftlearn.set_name(key, fam)
            assert _elements(a, name) == _elements(b, name)
            assert len(_elements(b, name)) == batch  # the seeded one removed, the absent one no error


def test_a_refused_netlink_batch_raises_and_commits_nothing() -> None:
    with throwaway_netns("lnE") as ns, inside(ns):
        m = build_model(program(cnp("names", ["*.example.test"])))
        nft_file(ns, render_full(m))
        key = learned_rules(program(cnp("names", ["*.example.test"])))[0]
        sets = nftlearn.NetlinkSets(FAMILY, TABLE)
        ok = LearnedEntry(key, ipaddress.ip_address("192.0.2.1"), time.monotonic() + 60)
        gone = nftlearn.set_name("a rule whose set is not there", 4)
        with pytest.raises(OSError):
            sets.learn({**m.learned, gone: ""}, [ok, LearnedEntry("a rule whose set is not there",
                                                                   ipaddress.ip_address("192.0.2.2"),
                                                                   time.monotonic() + 60)], [], time.monotonic())
        assert _elements(ns, nftlearn.set_name(key, 4)) == {}
        sets.learn(m.learned, [ok], [], time.monotonic())  # the socket still serves
        assert set(_elements(ns, nftlearn.set_name(key, 4))) == {"192.0.2.1"}
        sets.close()
        out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset"],
                             capture_output=True, text=True, check=True).stdout
        assert json.loads(out)
