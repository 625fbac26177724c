"""A NetBird overlay inside the namespace lab.

The local peer is the lab's node namespace; every other peer is a namespace of its own.
Each holds a TUN device `wt0` (NetBird's interface under userspace WireGuard: an L3
device, packets start at the IP header) with the peer's overlay IPv4 (/16 inside
100.64.0.0/10) and IPv6 (/64). A relay process (tests/kit/tunrelay.py) owns every wt0 and moves
packets between them by destination address, as NetBird's userspace WireGuard does.
Each peer runs netprobe TCP/UDP servers.

Nothing leaves the lab's namespaces: the relay only reads and writes TUN fds. The relay
and servers are registered with the Lab (killed by its close()); `close()` here removes
the peers' namespaces, and runs even after failures (use it as a context manager).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from tests.kit import NETPROBE, ROOT, Lab, probe_from, sh, stop, tunrelay, until

DEVICE = "wt0"
PREFIX4, PREFIX6 = 16, 64
LOCAL = "local"


@dataclass
class NbPeer:
    name: str
    netns: str
    ipv4: str
    ipv6: str
    ports: tuple[int, ...]

    @property
    def ips(self) -> tuple[str, str]:
        return (self.ipv4, self.ipv6)


@dataclass
class NetbirdLab:
    lab: Lab
    device: str = DEVICE
    peers: dict[str, NbPeer] = field(default_factory=dict)  # LOCAL is the node namespace
    relay: subprocess.Popen | None = None
    servers: list[subprocess.Popen] = field(default_factory=list)
    _created: list[str] = field(default_factory=list)

    def __enter__(self) -> NetbirdLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def local(self) -> NbPeer:
        return self.peers[LOCAL]

    def add_local(self, ipv4: str, ipv6: str, ports: Iterable[int] = ()) -> NbPeer:
        """The local peer lives in the lab's node namespace (where the agent runs)."""
        peer = NbPeer(LOCAL, self.lab.node, ipv4, ipv6, tuple(ports))
        self.peers[LOCAL] = peer
        return peer

    def add_peer(self, name: str, ipv4: str, ipv6: str, ports: Iterable[int] = ()) -> NbPeer:
        netns = f"{self.lab.prefix}-nb{len(self.peers)}"
        sh("ip", "netns", "add", netns)
        self._created.append(netns)
        sh("ip", "link", "set", "lo", "up", ns=netns)
        peer = NbPeer(name, netns, ipv4, ipv6, tuple(ports))
        self.peers[name] = peer
        return peer

    def start(self) -> None:
        """Create every wt0 through the relay, address them, start the servers."""
        self.relay = subprocess.Popen(
            tunrelay.command(self.device, {p.netns: ",".join(p.ips) for p in self.peers.values()}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        self.lab.procs.append(self.relay)
        assert self.relay.stdout is not None
        if self.relay.stdout.readline().strip() != "ready":
            self.relay.kill()
            raise RuntimeError(f"tunrelay did not start: {self.relay.communicate(timeout=5)[1]}")
        for p in self.peers.values():
            sh("ip", "addr", "add", f"{p.ipv4}/{PREFIX4}", "dev", self.device, ns=p.netns)
            sh("ip", "-6", "addr", "add", f"{p.ipv6}/{PREFIX6}", "dev", self.device, "nodad", ns=p.netns)
            if p.ports:
                server = subprocess.Popen(
                    ["ip", "netns", "exec", p.netns, sys.executable, str(NETPROBE), "serve", *map(str, p.ports)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                )
                self.lab.procs.append(server)
                self.servers.append(server)
                if server.stdout is None or server.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"netprobe server on peer {p.name} did not start")

    def probe_many(self, targets: dict[str, Sequence[str]], timeout: float = 1.5) -> dict[str, dict[str, bool]]:
        """targets: peer name (or LOCAL) -> netprobe specs; every source probes concurrently."""
        return probe_from({src: self.peers[src].netns for src in targets}, targets, timeout)

    def close(self) -> None:
        """Stop the relay and servers (the Lab would too) and delete the peers' namespaces."""
        for proc in [*self.servers, *([self.relay] if self.relay else [])]:
            stop(proc)
        for netns in self._created:
            sh("ip", "netns", "del", netns, check=False)


def wait_for(check: Callable[[], bool], timeout: float = 20.0, interval: float = 0.2) -> bool:
    """The lab's `until`, with the overlay's slower defaults."""
    return until(check, timeout, interval)
