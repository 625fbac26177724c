"""The DNS egress learner's unit tests' shared parts: a domainNames policy over the
builders' BASE pods, a hold that holds nothing, and a DNS answer as bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dns.message
import dns.rrset

WEB, API = "10.0.0.1", "10.0.0.2"  # builders.BASE: a/web, a/api (team=red: the subjects)
CNP = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
       "metadata": {"name": "names"},
       "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchLabels": {"team": "red"}}},
                "egress": [{"action": "Accept", "to": [{"domainNames": ["*.example.test"]}]},
                           {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}]}}


class FakeHold:
    """What DnsEgress needs of agent.dns.hold.Hold: devices by address, attached ones kept."""

    def __init__(self, on_answer: Callable[..., None], **kw: Any) -> None:
        self.on_answer, self.attached = on_answer, []

    def device_for(self, ip: Any) -> str:
        return f"veth-{ip}"

    def attach(self, dev: str) -> None:
        self.attached.append(dev)


def answer(name: str, *ips: str, ttl: int = 100) -> bytes:
    """A NOERROR response to `name` A with these addresses."""
    r = dns.message.make_response(dns.message.make_query(name, "A"))
    r.answer.append(dns.rrset.from_text(name + ".", ttl, "IN", "A", *ips))
    return r.to_wire()
