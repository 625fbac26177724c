"""Stand-alone relay standing in for NetBird's userspace WireGuard (no project imports).

    tunrelay.py DEVICE NETNS=ADDR[,ADDR...] ...

For each NETNS (a name under /run/netns): join its network namespace, create the TUN
device DEVICE there (IFF_TUN | IFF_NO_PI: packets start at the IP header, as on NetBird's
wt0), bring it up, and return to the original namespace. Prints "ready" once every
device exists, then forwards each packet read from one device to the device of the
namespace that owns the packet's destination address (the ADDRs). Packets to unknown
destinations (multicast, router solicitations, ...) are dropped. Nothing is ever sent
outside these TUN devices. The devices disappear when the process exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import select
import socket
import struct
import sys

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_tun(netns: str, device: str) -> int:
    """The fd of a new TUN `device` inside `netns`, already up."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR)
            ifr = struct.pack("16sH", device.encode(), IFF_TUN | IFF_NO_PI)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # in netns
                flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", device.encode(), 0)))[1]
                fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", device.encode(), flags | IFF_UP))
        finally:
            _setns(home)
    finally:
        os.close(home)
        os.close(target)
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
    fds = []
    for spec in specs:
        netns, _, addrs = spec.partition("=")
        fd = open_tun(netns, device)
        fds.append(fd)
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
                if out is not None and out != fd:
                    with contextlib.suppress(OSError):  # queue full: drop, as a lossy link would
                        os.write(out, packet)


if __name__ == "__main__":
    main(sys.argv[1:])
