"""Kubernetes NetworkPolicy v1 semantics: Inventory -> IR. Pure: no I/O.

Follows the API reference (networking.k8s.io/v1):
- a pod is isolated for a direction when any policy of that type selects it;
- policies are additive; peers in from/to are OR'd; inside one peer namespaceSelector
  and podSelector are AND'd; podSelector alone means the policy's namespace;
- missing or empty from/to means any peer; missing or empty ports means any port and
  protocol; a port entry without `port` means every port of its protocol;
- named ports resolve against the destination pod: for ingress the selected pod, for
  egress each peer pod (so one egress rule may become one IR rule per port number).

Validation is the API server's (see `parse_policy`), and bad input fails closed: an
invalid peer, port or rule matches nothing; a policy whose podSelector or policyTypes do
not parse isolates every pod of its namespace (in every direction it could apply to) and
allows nothing; a pod whose labels do not parse is isolated by every policy of its
namespace, gets the rules only of policies selecting every pod, and is no peer of any
rule; a namespace whose labels do not parse is matched by no namespaceSelector.
"""

from agent.policy.kubernetes.compile import compile_inventory, compile_program
from agent.policy.kubernetes.parse import (
    API_PROTOCOLS,
    POLICY_TYPES,
    IPBlock,
    NetworkPolicy,
    Peer,
    PolicyRule,
    PortSpec,
    isolation_only,
    parse_cidr_sloppy,
    parse_policy,
)

__all__ = [
    "API_PROTOCOLS",
    "POLICY_TYPES",
    "IPBlock",
    "NetworkPolicy",
    "Peer",
    "PolicyRule",
    "PortSpec",
    "compile_inventory",
    "compile_program",
    "isolation_only",
    "parse_cidr_sloppy",
    "parse_policy",
]
