"""A throwaway network namespace for nft text: `nft -f` (or `nft -c -f`, a check) of a
rendered table or diff against a real kernel, and the table read back. Unit tests of the
nftables renderer use it; the host's firewall is never touched."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count

from tests.kit.privileges import require_privileges

_names = count()


@contextmanager
def throwaway_netns(tag: str) -> Iterator[str]:
    """A fresh, empty network namespace named after `tag`, removed afterwards (skips the
    test without the privileges)."""
    require_privileges()
    name = f"stk{tag}{os.getpid()}x{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nft_file(netns: str, text: str, check: bool = False) -> None:
    """`nft -f` of `text` (with `check`, `nft -c -f`: parsed and checked, nothing committed)
    inside `netns`, asserting nft accepts it."""
    with tempfile.NamedTemporaryFile("w", suffix=".nft", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        cmd = ["ip", "netns", "exec", netns, "nft", *(["-c"] if check else []), "-f", f.name]
        res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[:3000]


def nft_json(netns: str, *args: str) -> list[dict]:
    """`nft -j list ...` inside `netns`, as its list of objects."""
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", *args],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["nftables"] if out.strip() else []


def counter_packets(netns: str, family: str, table: str, name: str) -> int:
    """The packets a named counter of `table` has counted, inside `netns`."""
    return next(o["counter"]["packets"] for o in nft_json(netns, "counter", family, table, name) if "counter" in o)


def nft_list(netns: str, *args: str) -> str:
    """`nft list ...` inside `netns` (text, as people read it)."""
    return subprocess.run(["ip", "netns", "exec", netns, "nft", "list", *args],
                          capture_output=True, text=True, check=True).stdout


def table_objects(netns: str, family: str, table: str, by_content: bool = False) -> list[str]:
    """The table as the kernel holds it, independent of creation order: every object as
    JSON without its handle, sorted; rules keep their order inside their chain. With
    `by_content`, peer sets (`p_...`) are named by their type and elements, so tables whose
    set names differ but whose sets and rules are alike compare equal."""
    objs = nft_json(netns, "table", family, table)
    rename: dict[str, str] = {}
    if by_content:
        for obj in objs:
            body = obj.get("set")
            if body and body["name"].startswith("p_"):
                what = json.dumps([body.get("type"), body.get("flags"), body.get("elem")], sort_keys=True)
                rename[body["name"]] = "S" + hashlib.blake2s(what.encode(), digest_size=8).hexdigest()
    names = re.compile(r"\bp_[0-9a-f]+_[46]n?\b")
    out, pos = [], Counter[str]()
    for obj in objs:
        ((kind, body),) = obj.items()
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind == "rule":
            body["position"] = pos[body["chain"]]
            pos[body["chain"]] += 1
        text = json.dumps({kind: body}, sort_keys=True)
        out.append(names.sub(lambda x: rename.get(x[0], x[0]), text) if rename else text)
    return sorted(out)
