"""The DNS-egress lab shared by the DNS packet tests and bench/dnshold: the egress-names
ClusterNetworkPolicy, pods and their manifests from one address table, and a DNS server
script started in a pod's namespace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.kit import Lab
from tests.kit.builders import ns, pod
from tests.kit.enforcement import write


def names_policy(deny: list[str]) -> dict[str, Any]:
    """Pods of team=app may ask team=dns on UDP/53 and TCP/53, reach answered *.example.test addresses
    on TCP/80 (rule 1, "names"), and nothing else in `deny`."""
    return {
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "egress-names"},
        "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {"matchLabels": {"team": "app"}}},
                 "egress": [
                     {"name": "dns", "action": "Accept", "to": [{"namespaces": {"matchLabels": {"team": "dns"}}}],
                      "protocols": [{"udp": {"destinationPort": {"number": 53}}},
                                    {"tcp": {"destinationPort": {"number": 53}}}]},
                     {"name": "names", "action": "Accept", "to": [{"domainNames": ["*.example.test"]}],
                      "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
                     {"name": "rest", "action": "Deny", "to": [{"networks": deny}]},
                 ]},
    }


def manifests(pods: dict[str, list[str]], *extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Each pod's namespace (labelled team=<namespace>), the pods, then `extra`."""
    namespaces = sorted({key.split("/")[0] for key in pods})
    return [*(ns(n, team=n) for n in namespaces), *(pod(key, ips) for key, ips in pods.items()), *extra]


def start_dns_server(lab: Lab, netns: str, script: str) -> subprocess.Popen[str]:
    """Run `script` (a DNS server printing "ready" once bound) in `netns`; the lab stops it."""
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lab.procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def setup(lab: Lab, tmp: Path, pods: dict[str, list[str]], docs: list[dict[str, Any]], server_script: str) -> Path:
    """The pods in the lab, the DNS server in dns/server, `docs` in a manifest directory."""
    for key, ips in pods.items():
        lab.add_pod(key, ips)
    start_dns_server(lab, lab.pods["dns/server"].netns, server_script)
    src = tmp / "src"
    write(src, docs)
    return src
