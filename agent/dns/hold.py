"""Hold DNS answers on their way to a pod until the agent has seen them (proven on this
kernel by tests/integration/test_dns_hold.py; used by `stockade run --dns-egress`,
agent/dns/egress.py, which is off by default).

This kernel has no NFQUEUE, so the hold is tc + eBPF (bpf/dnshold.c), the same on both
dataplanes: a classifier on the tc egress hook of each pod's host-side veth redirects UDP
answers from port 53, and every TCP segment from port 53 but a bare SYN, to a TAP device
this object reads with one thread (so a TCP flow's segments keep their order). For each UDP
answer, and each DNS message a TCP segment completes (agent/dns/frames.py reassembles them
per flow), it calls `on_answer(pod address, DNS message)` -- the learner -- and, when that
taught something new, `commit()` -- the apply that puts the learned addresses into the
kernel; only then does it write the frame, unchanged, back out of the veth through an
AF_PACKET socket with PACKET_QDISC_BYPASS: that skips the qdisc layer, tc egress included,
so the released answer is not redirected again, and it reaches the pod as sent. Frames are
read one at a time and released at once while they teach nothing new; once one does, the
frames already queued are learned too, then one commit covers them all, then they are
released in order (one apply per burst of new addresses, not one per answer). Without
`commit`, `on_answer` does both (tests, benchmarks).

If the agent stops (crash, stuck loop), the heartbeat (a deadline in the BPF map, renewed
every `grace / 4`) runs out after `grace` seconds and the classifier stops holding: answers
pass unchanged (fail-open for DNS itself, the default), or are dropped (`fail_closed`: pods
retry until the agent is back). Addresses already learned stay in the kernel until their
expiry either way. An answer `on_answer` fails on is released all the same (learning
nothing: its addresses stay denied).

The program is compiled by bcc in a child (agent/dns/loader.py), which hands over its
program and map by file descriptor: this process never imports bcc.

Limits: IPv6 answers with extension headers and non-first IPv4 fragments pass unheld; TCP
reassembly is bounded and in order only (frames.py says what teaches nothing); the filter
is attached at its own tc priority (`PRIO`) AFTER the eBPF dataplane's filter, which passes
what it allows on to later filters: only answers the pod's ingress policy allows are held
(a packet from port 53 never skips that check; the nftables dataplane judges in the forward
path, before any qdisc).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from agent.dataplane.ebpf import bpfsys
from agent.dns.frames import UDP, Reassembly, parse
from agent.dns.loader import load
from agent.inventory import IPAddress

log = logging.getLogger(__name__)

CFG_DEADLINE, CFG_FAIL_CLOSED, CFG_TAP, ST_HELD, ST_UNHELD, ST_DROPPED, ST_HELD_TCP = range(7)
PRIO = 0x5ED  # runs after the eBPF dataplane's filter (0x5EC) on the same hook: see above
OLD_PRIOS = (0x5EB,)  # where earlier versions attached (before the dataplane): removed on sight
HANDLE = 1
TC_EGRESS = 0xFFFFFFF3
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
SOL_PACKET, PACKET_QDISC_BYPASS = 263, 20

OnAnswer = Callable[[IPAddress, bytes], object]
MAX_BATCH = 256  # frames read before one commit and their release
TAP_QUEUE = 4096  # frames the TAP device queues while the agent commits (the kernel's default: 500)

# What the hold needs of its process (and of the loader child it starts), beyond the agent's
# CAP_NET_ADMIN. deploy/overlays/dns-egress and systemd/stockade.service.d/dns-egress.conf
# grant exactly this; their tests read it from here.
TUN = "/dev/net/tun"
CAPABILITIES = {  # name -> bit (include/uapi/linux/capability.h)
    "CAP_NET_ADMIN": 12,  # the TAP device (TUNSETIFF), tc clsact filters on the pods' veths
    "CAP_NET_RAW": 13,    # the AF_PACKET socket that releases answers
    "CAP_PERFMON": 38,    # the verifier's pointer arithmetic on map values (loader child)
    "CAP_BPF": 39,        # loading the classifier and creating its map (loader child); map writes
}
CAP_SYS_ADMIN = 21  # also counts as CAP_BPF and CAP_PERFMON
ADDRESS_FAMILIES = ("AF_PACKET", "AF_UNIX", "AF_NETLINK")  # release; the loader's fd handover; tc, links
SYSCALLS = ("bpf",)
DEVICES = (TUN,)


class HoldError(RuntimeError):
    pass


def missing_capabilities(status: str) -> list[str]:
    """The CAPABILITIES a /proc/PID/status text's CapEff lacks."""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status, re.M)
    eff = int(m[1], 16) if m else 0
    admin = bool(eff >> CAP_SYS_ADMIN & 1)
    return [name for name, bit in CAPABILITIES.items()
            if not eff >> bit & 1 and not (admin and name in ("CAP_BPF", "CAP_PERFMON"))]


FILTER_NAME = "stockade-dnshold"


def remove_filters(netns: str | None = None) -> int:
    """Remove every hold filter from the namespace's devices (`stockade cleanup`: after an
    agent that held answers died -- with --dns-fail-closed its filters drop answers until
    then). Needs no bcc. Returns how many were removed."""
    from pyroute2 import IPRoute

    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        return sum(_remove(ipr, link["index"], (PRIO, *OLD_PRIOS)) for link in ipr.get_links())


def _remove(ipr: Any, idx: int, prios: tuple[int, ...]) -> int:
    """Delete our hold filters (by name: never another's) at `prios` on device `idx`."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        msgs = ipr.get_filters(index=idx, parent=TC_EGRESS)
    except NetlinkError:
        return 0  # no clsact qdisc here
    removed = 0
    for m in msgs:
        opts = m.get_attr("TCA_OPTIONS")
        prio = m["info"] >> 16
        if (prio in prios and m.get_attr("TCA_KIND") == "bpf" and opts
                and opts.get_attr("TCA_BPF_NAME") == FILTER_NAME):
            with contextlib.suppress(NetlinkError):
                ipr.tc("del-filter", "bpf", idx, HANDLE, parent=TC_EGRESS, prio=prio)
                removed += 1
    return removed


class Hold:
    """The hold for one node network namespace `netns` (a name under /run/netns, None: the
    current one). Construct it from a thread inside that namespace (the TAP device and the
    AF_PACKET socket are made there); `start()` then serves from threads of its own."""

    def __init__(self, on_answer: OnAnswer, netns: str | None = None, tap: str = "stkdns0", grace: float = 1.0,
                 fail_closed: bool = False, on_released: Callable[[float], None] | None = None,
                 commit: Callable[[], object] | None = None) -> None:
        from pyroute2 import IPRoute

        missing = missing_capabilities(Path("/proc/self/status").read_text())
        if missing:
            raise HoldError(f"the DNS answer hold (--dns-egress) needs {', '.join(CAPABILITIES)}; this process "
                            f"lacks {', '.join(missing)} (deploy/overlays/dns-egress and "
                            "systemd/stockade.service.d/dns-egress.conf grant them)")
        self.on_answer = on_answer
        # With `commit`: `on_answer` only learns, returning true when the kernel must change;
        # the frames read together are learned, then `commit()` runs once, then they are
        # released. One kernel update covers a burst (an update costs milliseconds).
        self.commit = commit
        self.commits = 0
        self._dirty = False
        self.on_released = on_released  # seconds from reading an answer to releasing it
        self.grace = grace
        self.latencies: deque[float] = deque(maxlen=10000)  # seconds from read to release
        self.released = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._devices: dict[IPAddress, str] = {}
        self.tcp = Reassembly()
        # pyroute2 may open its socket from a thread of its own: name the namespace
        self.ipr = IPRoute(netns=netns) if netns else IPRoute()
        try:
            self.tap_fd = os.open(TUN, os.O_RDWR | os.O_NONBLOCK)
        except OSError as e:
            raise HoldError(f"the DNS answer hold (--dns-egress) needs the TUN device {TUN}: {e}") from e
        self.prog_fd, map_fd = load()  # compiled in a child: this process never carries bcc's LLVM
        self.map = bpfsys.Map(map_fd, "dnshold")
        fcntl.ioctl(self.tap_fd, TUNSETIFF, struct.pack("16sH22x", tap.encode(), IFF_TAP | IFF_NO_PI))
        with contextlib.suppress(OSError):  # no IPv6 autoconfiguration chatter on the TAP
            Path(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6").write_text("1")
        self.tap_index = self.ipr.link_lookup(ifname=tap)[0]
        self.ipr.link("set", index=self.tap_index, state="up", txqlen=TAP_QUEUE)
        self.out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: sends only
        self.out.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        self._set(CFG_FAIL_CLOSED, int(fail_closed))
        self._set(CFG_TAP, self.tap_index)
        self.attached: list[int] = []

    # ------------------------------------------------------------ BPF map

    def _set(self, k: int, v: int) -> None:
        self.map.update(struct.pack("<I", k), struct.pack("<Q", v))

    def stat(self, k: int) -> int:
        raw = self.map.lookup(struct.pack("<I", k))
        return struct.unpack("<Q", raw)[0] if raw else 0

    @property
    def stats(self) -> dict[str, int]:
        """Frames held (UDP answers and TCP segments; `held_tcp` of them TCP), and answers
        passed or dropped because the heartbeat had stopped."""
        return {"held": self.stat(ST_HELD), "held_tcp": self.stat(ST_HELD_TCP), "unheld": self.stat(ST_UNHELD),
                "dropped": self.stat(ST_DROPPED)}

    def beat(self) -> None:
        self._set(CFG_DEADLINE, time.monotonic_ns() + int(self.grace * 1e9))

    # ------------------------------------------------------------ devices

    def attach(self, ifname: str) -> None:
        """Hold answers going out of `ifname` (a pod's host-side veth)."""
        from pyroute2.netlink.exceptions import NetlinkError

        idx = self.ipr.link_lookup(ifname=ifname)[0]
        try:
            self.ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        # replace: a filter a previous agent left at our prio is taken over; one an earlier
        # version left before the dataplane's filter would hold answers unjudged: it goes
        self.ipr.tc("replace-filter", "bpf", idx, HANDLE, fd=self.prog_fd, name=FILTER_NAME,
                    parent=TC_EGRESS, classid=1, direct_action=True, prio=PRIO)
        _remove(self.ipr, idx, OLD_PRIOS)
        self.attached.append(idx)

    def device_for(self, dst: IPAddress) -> str | None:
        """The device the node routes `dst` out of (the pod's veth), cached."""
        name = self._devices.get(dst)
        if name is None:
            routes = self.ipr.route("get", dst=str(dst))
            oif = routes[0].get_attr("RTA_OIF") if routes else None
            links = self.ipr.get_links(oif) if oif else []
            name = links[0].get_attr("IFLA_IFNAME") if links else None
            if name is not None:
                self._devices[dst] = name
        return name

    # ------------------------------------------------------------ serving

    def start(self) -> None:
        self._stop.clear()
        self.beat()
        for target in (self._heartbeat, self._serve):
            t = threading.Thread(target=target, name=f"dnshold-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.grace / 4):
            self.beat()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.tap_fd], [], [], 0.2)
            if not ready:
                continue
            try:
                first = (os.read(self.tap_fd, 65536), time.perf_counter())
            except BlockingIOError:
                continue
            self.handle_batch(self._frames(first))

    def _frames(self, first: tuple[bytes, float]) -> Iterator[tuple[bytes, float]]:
        """`first`, then -- only once a frame taught something new (a commit is due) -- the
        frames already queued, up to MAX_BATCH: they are learned before that one commit."""
        yield first
        for _ in range(MAX_BATCH - 1):
            if not self._dirty:
                return
            try:
                yield os.read(self.tap_fd, 65536), time.perf_counter()
            except BlockingIOError:
                return

    def handle(self, frame: bytes, t0: float) -> None:
        self.handle_batch([(frame, t0)])

    def handle_batch(self, batch: Iterable[tuple[bytes, float]]) -> None:
        """Learn from each frame in order, releasing it at once while nothing new was
        learned; from the first answer that taught something new on, frames wait: then
        `commit()` runs once and they are released, in order (a TCP flow's segments never
        overtake each other)."""
        waiting: list[tuple[bytes, float, IPAddress, bool]] = []
        self._dirty = False  # some answer of this batch taught something new: commit before releasing
        for frame, t0 in batch:
            p = parse(frame)
            if p is None:
                continue  # not an answer the classifier sent (the kernel's own TAP traffic)
            # UDP: the datagram is the message. TCP: the messages this segment completes (none
            # for most segments: those are released at once, in their flow's order all the same)
            messages = [p.payload] if p.proto == UDP else self.tcp.segment(p)
            for msg in messages:
                try:
                    learned = bool(self.on_answer(p.dst, msg))
                    self._dirty = self._dirty or (learned and self.commit is not None)
                except Exception:  # never lose the answer: release it, having learned nothing
                    log.exception("DNS answer to %s: learning failed; released unlearned", p.dst)
            if self._dirty:
                waiting.append((frame, t0, p.dst, bool(messages)))
            else:
                self._release(frame, t0, p.dst, bool(messages))
        if self._dirty and self.commit is not None:
            self.commits += 1
            try:
                self.commit()
            except Exception:
                log.exception("DNS answers: the kernel update failed; released all the same")
        for frame, t0, dst, answer in waiting:
            self._release(frame, t0, dst, answer)

    def _release(self, frame: bytes, t0: float, dst: IPAddress, answer: bool) -> None:
        dev = self.device_for(dst)
        if dev is None:
            log.warning("DNS answer to %s: no route to it; dropped", dst)
            return
        try:
            self.out.sendto(frame, (dev, 0))
        except OSError as e:
            self._devices.pop(dst, None)
            log.warning("DNS answer to %s: cannot release on %s: %s", dst, dev, e)
            return
        self.released += 1
        if answer:  # the hold time of answers, not of bare TCP segments
            took = time.perf_counter() - t0
            self.latencies.append(took)
            if self.on_released is not None:
                self.on_released(took)

    def stop(self) -> None:
        """Stop serving and beating (as a dead agent would): after `grace`, answers pass
        unheld (or are dropped, fail-closed). The filters stay: `close()` removes them."""
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads.clear()

    def close(self) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        self.stop()
        self._set(CFG_TAP, 0)
        for idx in self.attached:
            with contextlib.suppress(NetlinkError):
                self.ipr.tc("del-filter", "bpf", idx, HANDLE, parent=TC_EGRESS, prio=PRIO)
        self.attached.clear()
        self.out.close()
        os.close(self.tap_fd)
        self.ipr.close()
        self.map.close()
        os.close(self.prog_fd)
