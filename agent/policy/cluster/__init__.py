"""ClusterNetworkPolicy semantics (policy.networking.k8s.io/v1alpha2, and the v1alpha1
AdminNetworkPolicy / BaselineAdminNetworkPolicy it replaces): Inventory -> the ADMIN and
BASELINE tiers of the IR. Pure: no I/O.

Follows the API's documentation (apis/v1alpha2/clusternetworkpolicy_types.go):
- per direction: Admin tier, then NetworkPolicy, then Baseline tier, then allow. Within a
  tier, policies by ascending `priority` (0-1000); rules in the order written;
- equal priorities: the API lets an implementation pick any; Stockade orders them by
  policy name, then kind (AdminNetworkPolicy < BaselineAdminNetworkPolicy <
  ClusterNetworkPolicy), so the outcome is deterministic. The v1alpha1 singleton
  BaselineAdminNetworkPolicy `default` (no priority) comes after every Baseline CNP;
- Accept (v1alpha1 Allow) and Deny are final; Pass skips the rest of the Admin tier (in
  the Baseline tier it means nothing further applies: allowed);
- subject: pods of namespaces matching `namespaces`, or `pods` (namespaceSelector AND
  podSelector); peers likewise, plus (egress) `networks` CIDRs and `nodes`, a label
  selector over Node objects matching their InternalIP/ExternalIP addresses;
- ports: `protocols` (tcp/udp/sctp with destinationPort number or range, or
  destinationNamedPort) or, in v1alpha1, `ports` (portNumber, portRange, namedPort). A
  named port resolves on each destination pod (the subject for ingress, each peer pod for
  egress), whatever protocol that container port declares;
- hostNetwork pods are neither subjects nor peers (admission leaves them out).

Fail closed, as the API asks for peers it cannot read, applied to every invalid part:
- an invalid Accept rule matches nothing; an invalid Deny or Pass rule (or one whose
  action is unknown) is a Deny of everything in its direction;
- a policy whose tier, priority or spec cannot be read is read as Admin priority 0; one
  whose subject cannot be read selects every pod. Either way only its Deny rules apply,
  with its Pass rules read as Deny (a Pass could skip a Deny) and its Accept rules dropped;
- a pod or namespace whose labels did not validate is selected, as a subject or as a peer,
  only by empty selectors for certain; where a selector might match it, only what cannot
  widen applies: Deny rules, and Pass rules read as Deny. The same for Node labels.
"""

from agent.policy.cluster.compile import ClusterCompiler, TierRules
from agent.policy.cluster.model import ANP, BANP, CNP, KINDS, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule
from agent.policy.cluster.parse import parse_cluster_policy, unreadable

__all__ = [
    "ANP",
    "BANP",
    "CNP",
    "KINDS",
    "ClusterCompiler",
    "ClusterPeer",
    "ClusterPolicy",
    "ClusterPort",
    "ClusterRule",
    "TierRules",
    "parse_cluster_policy",
    "unreadable",
]
