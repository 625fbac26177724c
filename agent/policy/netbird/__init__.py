"""NetBird management-API policy semantics: the account -> IR for the local peer. Pure: no I/O.

model (the account), parse (API objects read fail-closed), posture (checks per peer),
compile (IR and the Inventory for explain/matrix).

Follows what NetBird's management server computes for one peer L (its
`networkmap_components.go`, `account.go`):

- disabled policies and disabled rules are skipped entirely;
- sources = the `sourceResource` peer (type `peer`) or the union of the source groups'
  peers, filtered by the policy's `source_posture_checks`; destinations likewise, without
  posture filtering; the built-in group `All` is every peer; unknown or empty groups give
  nothing; a rule with neither sources nor `sourceResource` (NetBird issue #3583) matches
  nothing and is reported as a warning, never treated as "any";
- L never gets a rule about itself;
- L in sources -> OUT to each destination; L in destinations -> IN from each source;
  `bidirectional` adds the mirror image; ports are always the destination port;
- `ports` (strings) win over `port_ranges` (ints); neither means every port;
  protocols all | tcp | udp | icmp | netbird-ssh (as tcp);
- any matching drop beats any matching accept: every drop rule comes first in IR order;
- default deny inbound. Outbound (stricter than NetBird's own client, which ignores OUT
  rules) is enforced only towards the NetBird network: a final accept rule covers every
  address outside it, so dataplanes need no special case. `inbound_only` leaves egress
  unenforced, like NetBird's client.

Invalid input fails closed (read_policy): every invalid part of a rule is reported (policy,
rule id and name, field path) and resolved to the stricter side. In a drop rule it matches
everything: unknown protocol = every protocol, bad ports or ranges = every port,
bidirectional invalid or missing = both ways, enabled invalid or missing = enabled, a bad
group reference or resource = every peer, no sources/destinations at all = every peer. In
an accept rule it matches nothing (bad entries drop out; nothing valid left = the rule is
void, never "every port"). An unknown action counts as drop; an unreadable rule is a drop
of everything; a policy whose `enabled` is invalid keeps its drops and loses its accepts.
The source keeps an invalid policy's last good version in force and adds the drops of the
invalid one (agent/admission/netbird.py).

Posture checks are evaluated per source peer with three outcomes. `nb_version_check` and
`geo_location_check` are evaluated from /api/peers data. Checks the REST data cannot
evaluate (os_version_check, peer_network_range_check, process_check, unknown kinds, or a
referenced check whose definition is invalid) are UNKNOWN, and UNKNOWN always resolves to
the stricter side: the peer is left out of accept rules (the check counts as failing) and
kept in drop rules (the check counts as passing). A referenced check id that does not
exist at all is skipped (passes), as NetBird does.
"""

from agent.policy.netbird.compile import Compiled, account_inventory, bootstrap_program, compile_account, inside_network
from agent.policy.netbird.model import (
    ACTIONS,
    ALL_GROUP,
    CTX_ACCOUNT,
    CTX_LOCAL_PEER,
    DEFAULT_INTERFACE,
    DEFAULT_RANGES,
    NETBIRD_PROTOCOLS,
    SOURCE,
    Account,
    Check,
    GeoCheck,
    Group,
    NbRule,
    Peer,
    Policy,
    PostureCheck,
    ResourceRef,
    UnevaluableCheck,
    VersionCheck,
)
from agent.policy.netbird.parse import (
    parse_group,
    parse_peer,
    parse_policy,
    parse_posture_check,
    parse_version,
    read_policy,
)
from agent.policy.netbird.posture import Posture, posture

__all__ = [
    "ACTIONS",
    "ALL_GROUP",
    "CTX_ACCOUNT",
    "CTX_LOCAL_PEER",
    "DEFAULT_INTERFACE",
    "DEFAULT_RANGES",
    "NETBIRD_PROTOCOLS",
    "SOURCE",
    "Account",
    "Check",
    "Compiled",
    "GeoCheck",
    "Group",
    "NbRule",
    "Peer",
    "Policy",
    "Posture",
    "PostureCheck",
    "ResourceRef",
    "UnevaluableCheck",
    "VersionCheck",
    "account_inventory",
    "bootstrap_program",
    "compile_account",
    "inside_network",
    "parse_group",
    "parse_peer",
    "parse_policy",
    "parse_posture_check",
    "parse_version",
    "posture",
    "read_policy",
]
