"""User-derived strings on their way into kernel text and human-readable output.

Pod, namespace, policy and NetBird peer names are free text as far as a dataplane is
concerned (admission may be stricter; the renderers must not rely on it). nft has no
escape sequences inside a quoted string (its scanner takes everything up to the next
`"`), so nothing is escaped for nft: a name is turned into a *display form* that holds
only printable characters other than `"` and `\\`, everything else written as a
Python-style `\\xHH` / `\\uHHHH` / `\\UHHHHHHHH` escape, and cut to a byte budget on a
character boundary. Identifiers (chain and set names, rule comments, log prefixes) never
carry a name at all: they are hashes (nftables.chain_name and _peer_sets, ir.Rule.id).
"""

from __future__ import annotations

import re

ELLIPSIS = "..."
# Linux device names (dev_valid_name: 1-15 bytes, no '/', ':' or whitespace), further
# restricted to what nft takes literally in a quoted string (no '"', '\\' or a '*' wildcard).
_IFNAME = re.compile(r"[A-Za-z0-9_.+=@%,\-]{1,15}")


def _escape_char(c: str) -> str:
    if c.isprintable() and c not in '"\\':
        return c
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def display(text: str, limit: int | None = None) -> str:
    """`text` with every non-printable character, `"` and `\\` escaped (so the result is
    printable, one line, valid UTF-8 and safe inside any double-quoted kernel string),
    at most `limit` UTF-8 bytes: a cut form ends in "..." and never splits a character
    or an escape."""
    parts = [_escape_char(c) for c in text]
    full = "".join(parts)
    if limit is None or len(full.encode()) <= limit:
        return full
    out: list[str] = []
    used = len(ELLIPSIS)
    for p in parts:
        used += len(p.encode())
        if used > limit:
            break
        out.append(p)
    return "".join(out) + ELLIPSIS


def valid_ifname(name: str) -> bool:
    """Whether `name` is a device name nft can take verbatim in a quoted string."""
    return bool(_IFNAME.fullmatch(name)) and name not in (".", "..")


def utf8(text: str) -> bytes:
    """Bytes of any Python string, lone surrogates included (JSON can carry "\\ud800"):
    injective, so hashes of distinct names stay distinct."""
    return text.encode("utf-8", "surrogatepass")
