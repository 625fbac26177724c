"""Builders of NetBird management-API objects (peers, groups, rules, policies) with fixed peer addresses."""

from __future__ import annotations

from typing import Any

IP = {"L": "100.64.0.1", "A": "100.64.0.2", "B": "100.64.0.3", "C": "100.64.0.4"}
IP6 = {"L": "fd00:4e42::1", "A": "fd00:4e42::2"}


def peer(pid: str, **kw: Any) -> dict[str, Any]:
    body = {
        "id": pid, "name": f"peer-{pid.lower()}", "ip": IP[pid], "connected": True, "os": "linux",
        "version": "0.77.1", "groups": [], "hostname": pid.lower(), "dns_label": pid.lower(),
        "country_code": "DE", "city_name": "Berlin", "login_expired": False,
    }
    if pid in IP6:
        body["ipv6"] = IP6[pid]
    body.update(kw)
    return body


def group(gid: str, members: list[str] | None, name: str | None = None) -> dict[str, Any]:
    return {
        "id": gid, "name": name or gid, "peers_count": len(members or []), "resources_count": 0,
        "issued": "api", "peers": None if members is None else [{"id": m, "name": f"peer-{m.lower()}"}
                                                                for m in members],
        "resources": None,
    }


def gref(gid: str) -> dict[str, Any]:
    """A group as it appears inside a policy rule in responses."""
    return {"id": gid, "name": gid, "peers_count": 2, "issued": "api"}


def rule(src: list[str] | None, dst: list[str] | None, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "r", "name": "rule", "description": "", "enabled": True, "action": "accept",
        "bidirectional": False, "protocol": "all", "ports": None, "port_ranges": None,
        "sources": None if src is None else [gref(g) for g in src],
        "destinations": None if dst is None else [gref(g) for g in dst],
    }
    body.update(kw)
    return body


def policy(pid: str, *rules: dict[str, Any], **kw: Any) -> dict[str, Any]:
    body = {"id": pid, "name": f"pol-{pid}", "description": "", "enabled": True,
            "source_posture_checks": None, "rules": list(rules)}
    body.update(kw)
    return body
