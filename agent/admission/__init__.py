"""Admission: what the sources fetched, validated into parsed objects; last good versions kept.

`lastgood` (the store, shared by every source), `kubernetes` (Pods, Namespaces, Nodes,
NetworkPolicies, ClusterNetworkPolicies and the v1alpha1 Admin/BaselineAdminNetworkPolicies),
`netbird` (the NetBird account).
"""

from agent.admission.kubernetes import KubernetesAdmission, kubernetes_inventory
from agent.admission.lastgood import LastGood

__all__ = ["KubernetesAdmission", "LastGood", "kubernetes_inventory"]
