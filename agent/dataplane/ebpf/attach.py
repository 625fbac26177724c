"""Devices: which host-side interface judges each endpoint (routes, or the device an
endpoint is bound to), and the tc filters that attach the pinned programs to them
(clsact, direct-action, prio `FILTER_PRIO`, handle 1, named after build and program)."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
import struct
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

Net = ipaddress.IPv4Network | ipaddress.IPv6Network

# rtnetlink multicast groups: links, tc, IPv4/IPv6 addresses and routes
GROUPS = 0x1 | 0x8 | 0x10 | 0x40 | 0x100 | 0x400
RTM_NEWLINK, RTM_DELLINK, RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER = 16, 17, 37, 44, 45
RTM_TC = range(36, 52)  # qdisc, class and filter messages
CLONE_NEWNET = 0x40000000


class Watch:
    """A netlink socket subscribed to the namespace's link, address, route and tc changes,
    drained before each use of the cached scan: what changed since the last look."""

    def __init__(self, netns: str | None) -> None:
        self.sock: socket.socket | None = None
        try:
            self.sock = self._open(netns)
        except OSError as e:  # no cache then: every look rescans
            log.warning("eBPF: cannot watch netlink changes (%s): devices are rescanned on every apply", e)

    @staticmethod
    def _open(netns: str | None) -> socket.socket:
        if netns is None:
            return Watch._socket()
        # made inside the named netns by this thread alone (setns is per thread), then back
        libc = ctypes.CDLL(None, use_errno=True)
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            there = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(there, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
                try:
                    return Watch._socket()
                finally:
                    if libc.setns(here, CLONE_NEWNET) != 0:  # cannot stay in the wrong netns
                        raise SystemExit(f"cannot return from netns {netns}")
            finally:
                os.close(there)
        finally:
            os.close(here)

    @staticmethod
    def _socket() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)  # NETLINK_ROUTE
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, GROUPS))
        return sock

    def poll(self) -> tuple[bool, set[int] | None]:
        """(links, addresses or routes changed; ifindexes whose tc state or link changed,
        None: unknown, assume every one)."""
        if self.sock is None:
            return True, None
        net, touched = False, set()
        while True:
            try:
                buf = self.sock.recv(1 << 16)
            except BlockingIOError:
                return net, touched
            except OSError as e:  # ENOBUFS: events were lost
                log.info("eBPF: netlink change events lost (%s): rescanning devices", e)
                return True, None
            off = 0
            while off + 16 <= len(buf):
                length, kind = struct.unpack_from("=IH", buf, off)
                if length < 16:
                    break
                if kind in RTM_TC:
                    if kind in (RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER) and off + 24 <= len(buf):
                        touched.add(struct.unpack_from("=i", buf, off + 20)[0])
                else:
                    net = True
                    if kind in (RTM_NEWLINK, RTM_DELLINK) and off + 24 <= len(buf):
                        touched.add(struct.unpack_from("=i", buf, off + 20)[0])
                off += (length + 3) & ~3

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Devices:
    """Routes, links and tc filters of one network namespace (pyroute2, opened lazily).
    Routes, links and addresses are dumped again only after netlink reported a change
    (`Watch`), and a device's filters are checked only when first attached or after its
    link or tc state changed: an event costs what it touches, not a dump per device."""

    def __init__(self, netns: str | None, build: str) -> None:
        self.netns = netns  # named netns (None: the current one)
        self.build = build
        self.unattached: dict[str, str] = {}  # endpoint key -> why it has no interface
        self.links: dict[int, Any] = {}  # ifindex -> link message, as of the last scan
        self._ipr: Any = None
        self._watch: Watch | None = None
        self._scanned = False
        self._byname: dict[str, int] = {}
        self._hosts: dict[IPAddress, int] = {}  # host routes: address -> ifindex
        self._wide: list[tuple[Net, int]] = []  # other direct routes, longest prefix first
        self._addrs: set[IPAddress] = set()
        self._attached: dict[int, str] = {}  # ifindex -> the filter names (both hooks) known on it
        self.pod_device: dict[str, int] = {}  # endpoint key -> its one device, a pod's veth (as of `find`)

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
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self._scanned = False
        self._attached = {}

    def _refresh(self) -> None:
        """Rescan what netlink reported changed since the last look (everything the first time)."""
        if self._watch is None:
            self._watch = Watch(self.netns)  # before the first scan: no change slips between
        net, touched = self._watch.poll()
        if touched is None:
            self._attached = {}
        else:
            for idx in touched:
                self._attached.pop(idx, None)
        if net or not self._scanned:
            self._scan()

    def _scan(self) -> None:
        self.links = {msg["index"]: msg for msg in self.ipr.get_links()}
        self._byname = {msg.get_attr("IFLA_IFNAME"): idx for idx, msg in self.links.items()}
        self._attached = {idx: v for idx, v in self._attached.items() if idx in self.links}
        hosts: dict[IPAddress, int] = {}
        wide: list[tuple[Net, int]] = []
        for net, oif in self._routes():
            if net.prefixlen == net.max_prefixlen:
                hosts.setdefault(net.network_address, oif)  # the first of equals, as before
            else:
                wide.append((net, oif))
        wide.sort(key=lambda r: -r[0].prefixlen)  # stable: the first of equal prefixes wins
        self._hosts, self._wide = hosts, wide
        addrs: set[IPAddress] = set()
        for msg in self.ipr.get_addr():
            a = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            if a:
                addrs.add(ipaddress.ip_address(a))
        self._addrs = addrs
        self._scanned = True

    def node_addresses(self) -> set[IPAddress]:
        self._refresh()
        return set(self._addrs)

    def _route(self, ip: IPAddress) -> int | None:
        """The device of the longest directly connected route to `ip`."""
        if (idx := self._hosts.get(ip)) is not None:
            return idx
        return next((oif for net, oif in self._wide if ip in net), None)

    def names(self) -> dict[int, str]:
        return {m["index"]: m.get_attr("IFLA_IFNAME") for m in self.ipr.get_links()}

    def is_l3(self, idx: int) -> bool:
        """A raw IP device (TUN): no Ethernet header."""
        return bool(self.links[idx]["ifi_type"] != ARPHRD_ETHER)

    def is_peer(self, idx: int) -> bool:
        """A veth (or netkit) whose other end is in another network namespace -- a pod's:
        bpf_redirect_peer can hand it packets (it drops them on any other device)."""
        msg = self.links[idx]
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        return kind in ("veth", "netkit") and msg.get_attr("IFLA_LINK_NETNSID") is not None

    def _routes(self) -> list[tuple[Net, int]]:
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
        self._refresh()
        byname = self._byname
        out: dict[int, Device] = {}
        bound: dict[int, str] = {}
        before, self.unattached = self.unattached, {}
        self.pod_device = {}
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
            idxs = {idx for ip in ep.ips if (idx := self._route(ip)) is not None}
            if not idxs:
                self.unattached[ep.key] = "no directly connected route to its addresses"
                continue
            for i in idxs:
                h, b = out.get(i, (False, 0))
                out[i] = (h or host, b)
            if not host and len(idxs) == 1 and self.is_peer(only := next(iter(idxs))):
                self.pod_device[ep.key] = only
        for key, why in self.unattached.items():
            if before.get(key) != why:
                log.warning("eBPF: endpoint %s is not enforced: %s", display(key, 300), display(why, 300))
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

        # the program id makes the name unique per load: a filter left by another load
        # of the same build (e.g. pins lost with a private mount namespace) is replaced
        names = {hook: f"stockade-{self.build}-{'in' if hook == 0 else 'eg'}-{prog_ids[hook]}" for hook in PARENTS}
        tag = " ".join(names.values())
        if self._attached.get(idx) == tag:  # in place, and no tc or link change seen on it since
            return
        have = self.filter_names(idx)
        for hook, parent in PARENTS.items():
            name = names[hook]
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
        self._attached[idx] = tag

    def detach(self, idx: int, only_ours: bool = False) -> None:
        """Remove our filters from a device (`only_ours`: only those named stockade-*,
        the filters `cleanup` may remove whatever build left them)."""
        from pyroute2.netlink.exceptions import NetlinkError

        self._attached.pop(idx, None)
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
