"""NetBird posture checks, evaluated per peer with three outcomes (pass, fail, unknown). Pure."""

from __future__ import annotations

import enum
from collections.abc import Iterable

from agent.policy.netbird.model import Account, Check, GeoCheck, Peer, VersionCheck
from agent.policy.netbird.parse import parse_version

# ---------------------------------------------------------------- posture


class Posture(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    UNKNOWN = "unknown"


def _check(check: Check, peer: Peer) -> Posture:
    if isinstance(check, VersionCheck):
        v = parse_version(peer.version)
        return Posture.PASS if v is not None and v >= check.min_version else Posture.FAIL
    if isinstance(check, GeoCheck):
        if not peer.country_code and not peer.city_name:
            return Posture.FAIL
        match = any(
            country == peer.country_code and (not city or city == peer.city_name)
            for country, city in check.locations
        )
        if check.action == "allow":
            return Posture.PASS if match else Posture.FAIL
        return Posture.FAIL if match else Posture.PASS
    return Posture.UNKNOWN


def posture(account: Account, check_ids: Iterable[str], peer: Peer) -> Posture:
    """All referenced checks must pass; unknown ids are skipped (pass), as NetBird does."""
    result = Posture.PASS
    for cid in check_ids:
        if cid in account.unknown_posture_checks:
            result = Posture.UNKNOWN
            continue
        pc = account.posture_checks.get(cid)
        if pc is None:
            continue
        for c in pc.checks:
            r = _check(c, peer)
            if r is Posture.FAIL:
                return Posture.FAIL
            if r is Posture.UNKNOWN:
                result = Posture.UNKNOWN
    return result
