"""Devices: which host-side interface judges each endpoint (routes, or the device an
endpoint is bound to), and the tc filters that attach the pinned programs to them
(clsact, direct-action, prio `FILTER_PRIO`, handle 1, named after build and program)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from typing import Any

from agent.dataplane.base import DataplaneError
from agent.dataplane.escape import display
from agent.ir import IPAddress, Program

log = logging.getLogger(__name__)

FILTER_PRIO = 0x5EC
FILTER_HANDLE = 1
PARENTS = {0: 0xFFFFFFF2, 1: 0xFFFFFFF3}  # tc ingress, tc egress (clsact)
ARPHRD_ETHER = 1

Device = tuple[bool, int]
"""(whether the endpoint behind it is the node itself, id of the endpoint bound to it or 0)."""


class Devices:
    """Routes, links and tc filters of one network namespace (pyroute2, opened lazily)."""

    def __init__(self, netns: str | None, build: str) -> None:
        self.netns = netns  # named netns (None: the current one)
        self.build = build
        self.unattached: dict[str, str] = {}  # endpoint key -> why it has no interface
        self.links: dict[int, Any] = {}  # ifindex -> link message, as of the last `find`
        self._ipr: Any = None

    @property
    def ipr(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def node_addresses(self) -> set[IPAddress]:
        out: set[IPAddress] = set()
        for msg in self.ipr.get_addr():
            a = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            if a:
                out.add(ipaddress.ip_address(a))
        return out

    def names(self) -> dict[int, str]:
        return {m["index"]: m.get_attr("IFLA_IFNAME") for m in self.ipr.get_links()}

    def is_l3(self, idx: int) -> bool:
        """A raw IP device (TUN): no Ethernet header."""
        return bool(self.links[idx]["ifi_type"] != ARPHRD_ETHER)

    def _routes(self) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]]:
        routes = []
        for fam in (socket.AF_INET, socket.AF_INET6):
            for msg in self.ipr.get_routes(family=fam, table=254):
                if msg.get_attr("RTA_GATEWAY") or msg.get_attr("RTA_MULTIPATH") or msg["dst_len"] == 0:
                    continue
                oif = msg.get_attr("RTA_OIF")
                dst = msg.get_attr("RTA_DST")
                if oif and dst:
                    routes.append((ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False), oif))
        return routes

    def find(self, program: Program, ep_ids: dict[str, int], node_addrs: set[IPAddress]) -> dict[int, Device]:
        """The device of every endpoint we enforce (`ep_ids`: endpoint key -> id)."""
        routes = self._routes()
        links = {msg["index"]: msg for msg in self.ipr.get_links()}
        byname = {msg.get_attr("IFLA_IFNAME"): idx for idx, msg in links.items()}
        out: dict[int, Device] = {}
        bound: dict[int, str] = {}
        before, self.unattached = self.unattached, {}
        for ep in program.endpoints.values():
            # attached even when nothing is enforced: flows are tracked for the replies
            if ep.interface:
                if ep.interface not in byname:
                    self.unattached[ep.key] = f"interface {ep.interface} does not exist"
                    continue
                # The node itself behind the device (as nftables judges it: iifname in
                # prerouting, oifname in output), bound to it: enforced with or without
                # addresses (NetBird's bootstrap endpoint has none).
                idx = byname[ep.interface]
                if idx in bound:
                    self.unattached[ep.key] = f"interface {ep.interface} is bound to {bound[idx]} already"
                    continue
                bound[idx] = ep.key
                out[idx] = (True, ep_ids[ep.key])
                continue
            host = any(ip in node_addrs for ip in ep.ips)
            idxs: set[int] = set()
            for ip in ep.ips:
                best = max((r for r in routes if ip in r[0]), key=lambda r: r[0].prefixlen, default=None)
                if best is not None:
                    idxs.add(best[1])
            if not idxs:
                self.unattached[ep.key] = "no directly connected route to its addresses"
                continue
            for i in idxs:
                h, b = out.get(i, (False, 0))
                out[i] = (h or host, b)
        for key, why in self.unattached.items():
            if before.get(key) != why:
                log.warning("eBPF: endpoint %s is not enforced: %s", display(key, 300), display(why, 300))
        self.links = links
        return out

    def filter_names(self, idx: int) -> dict[int, str]:
        """tc hook -> name of our filter on it (at our prio)."""
        from pyroute2.netlink.exceptions import NetlinkError

        out = {}
        for hook, parent in PARENTS.items():
            try:
                msgs = self.ipr.get_filters(index=idx, parent=parent)
            except NetlinkError:  # no clsact qdisc on this device (yet)
                continue
            for m in msgs:
                if (m["info"] >> 16) != FILTER_PRIO or m.get_attr("TCA_KIND") != "bpf":
                    continue
                opts = m.get_attr("TCA_OPTIONS")
                name = opts.get_attr("TCA_BPF_NAME") if opts else None
                if name:
                    out[hook] = name
        return out

    def attach(self, idx: int, prog_fds: dict[int, int], prog_ids: dict[int, int]) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        have = self.filter_names(idx)
        for hook, parent in PARENTS.items():
            # the program id makes the name unique per load: a filter left by another load
            # of the same build (e.g. pins lost with a private mount namespace) is replaced
            name = f"stockade-{self.build}-{'in' if hook == 0 else 'eg'}-{prog_ids[hook]}"
            if have.get(hook) == name:
                continue
            try:
                self.ipr.tc("add", "clsact", idx)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise DataplaneError(f"cannot add clsact qdisc on ifindex {idx}: {e}") from e
            cmd = "replace-filter" if hook in have else "add-filter"
            try:
                self.ipr.tc(cmd, "bpf", idx, FILTER_HANDLE, fd=prog_fds[hook], name=name,
                            parent=parent, classid=1, direct_action=True, prio=FILTER_PRIO)
            except NetlinkError as e:
                raise DataplaneError(f"cannot attach eBPF filter on ifindex {idx}: {e}") from e

    def detach(self, idx: int, only_ours: bool = False) -> None:
        """Remove our filters from a device (`only_ours`: only those named stockade-*,
        the filters `cleanup` may remove whatever build left them)."""
        from pyroute2.netlink.exceptions import NetlinkError

        for hook, name in self.filter_names(idx).items():
            if only_ours and not name.startswith("stockade-"):
                continue
            try:
                self.ipr.tc("del-filter", "bpf", idx, FILTER_HANDLE, parent=PARENTS[hook], prio=FILTER_PRIO)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise DataplaneError(f"cannot detach eBPF filter on ifindex {idx}: {e}") from e

    def detach_all(self) -> None:
        for msg in self.ipr.get_links():
            self.detach(msg["index"], only_ours=True)
