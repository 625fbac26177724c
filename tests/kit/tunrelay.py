"""Relay standing in for NetBird's userspace WireGuard (stdlib and tests.kit.netns only).

    python -m tests.kit.tunrelay DEVICE NETNS=ADDR[,ADDR...]|NETNS=* ...

For each NETNS (a name under /run/netns): join its network namespace, create the TUN
device DEVICE there (IFF_TUN | IFF_NO_PI: packets start at the IP header, as on NetBird's
wt0), bring it up, and return to the original namespace. Prints "ready" once every
device exists, then forwards each packet read from one device to the device of the
namespace that owns the packet's destination address (the ADDRs), or else to a namespace
given as NETNS=* (any destination) other than the one it came from; with two such, it
copies every packet across. Packets to unknown destinations (multicast, router
solicitations, ...) are otherwise dropped. Nothing is ever sent
outside these TUN devices. The devices disappear when the process exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import select
import socket
import struct
import sys

from tests.kit.netns import inside

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914


def command(device: str, peers: dict[str, str]) -> list[str]:
    """The relay's command line (run it with cwd=ROOT): netns -> "ADDR,..." or "*"."""
    return [sys.executable, "-m", "tests.kit.tunrelay", device, *(f"{ns}={addrs}" for ns, addrs in peers.items())]


def open_tun(netns: str, device: str) -> int:
    """The fd of a new TUN `device` inside `netns`, already up."""
    with inside(netns):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        ifr = struct.pack("16sH", device.encode(), IFF_TUN | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # in netns
            flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", device.encode(), 0)))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", device.encode(), flags | IFF_UP))
    os.set_blocking(fd, False)
    return fd


def destination(packet: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        return ipaddress.IPv4Address(packet[16:20])
    if version == 6 and len(packet) >= 40:
        return ipaddress.IPv6Address(packet[24:40])
    return None


def main(argv: list[str]) -> None:
    device, specs = argv[0], argv[1:]
    routes: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, int] = {}
    fds, anywhere = [], []
    for spec in specs:
        netns, _, addrs = spec.partition("=")
        fd = open_tun(netns, device)
        fds.append(fd)
        if addrs == "*":
            anywhere.append(fd)
            continue
        for a in filter(None, addrs.split(",")):
            routes[ipaddress.ip_address(a)] = fd
    print("ready", flush=True)
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            while True:
                try:
                    packet = os.read(fd, 65535)
                except BlockingIOError:
                    break
                out = routes.get(destination(packet))  # type: ignore[arg-type]
                if out is None:
                    out = next((other for other in anywhere if other != fd), None)
                if out is not None and out != fd:
                    with contextlib.suppress(OSError):  # queue full: drop, as a lossy link would
                        os.write(out, packet)


if __name__ == "__main__":
    main(sys.argv[1:])
