"""A minimal NFLOG reader: packets the nft table logs to a netlink log group.

The nftables dataplane logs a rate-limited sample of the packets it drops (or, in audit
mode, would drop) with a prefix naming the chain or rule; this reads them back and
decodes the 5-tuple. No library on PyPI or in Debian speaks NFLOG for Python, and the
protocol needed here is a few netlink messages, so it is written out (see
include/uapi/linux/netfilter/nfnetlink_log.h).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
L4_NAMES = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "icmpv6"}


@dataclass(frozen=True)
class LoggedPacket:
    prefix: str
    protocol: str
    src: str
    dst: str
    sport: int | None
    dport: int | None


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(group: int, attrs: bytes, seq: int) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + attrs
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    out = {}
    while len(data) >= 4:
        length, kind = struct.unpack_from("=HH", data)
        if length < 4:
            break
        out[kind & 0x7FFF] = data[4:length]
        data = data[(length + 3) & ~3 :]
    return out


def decode_payload(packet: bytes) -> tuple[str, str, str, int | None, int | None]:
    """(protocol, src, dst, sport, dport) of an IP packet (no extension-header walk)."""
    version = packet[0] >> 4
    if version == 4:
        proto, off = packet[9], (packet[0] & 0xF) * 4
        src, dst = ipaddress.IPv4Address(packet[12:16]), ipaddress.IPv4Address(packet[16:20])
    else:
        proto, off = packet[6], 40
        src, dst = ipaddress.IPv6Address(packet[8:24]), ipaddress.IPv6Address(packet[24:40])
    sport = dport = None
    if proto in (6, 17, 132) and len(packet) >= off + 4:
        sport, dport = struct.unpack_from("!HH", packet, off)
    return L4_NAMES.get(proto, str(proto)), str(src), str(dst), sport, dport


class NflogReader:
    """Binds one NFLOG group in the current network namespace."""

    def __init__(self, group: int) -> None:
        self.group = group
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, 0))
        self._config(_attr(NFULA_CFG_CMD, struct.pack("=Bxxx", NFULNL_CFG_CMD_BIND)[:1]), 1)
        self._config(_attr(NFULA_CFG_MODE, struct.pack("!IBx", 128, NFULNL_COPY_PACKET)), 2)

    def _config(self, attrs: bytes, seq: int) -> None:
        self.sock.send(_message(self.group, attrs, seq))
        reply = self.sock.recv(4096)
        _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", reply, 16)
            if err != 0:
                raise OSError(-err, f"NFLOG group {self.group}: {errno.errorcode.get(-err, err)}")

    def read(self, timeout: float | None = None) -> list[LoggedPacket]:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return []
        out = []
        while len(data) >= 16:
            length, kind, _, _, _ = struct.unpack_from("=IHHII", data)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                attrs = _attrs(data[20:length])
                payload = attrs.get(NFULA_PAYLOAD)
                if payload:
                    prefix = attrs.get(NFULA_PREFIX, b"").rstrip(b"\0").decode(errors="replace")
                    out.append(LoggedPacket(prefix, *decode_payload(payload)))
            data = data[(length + 3) & ~3 :]
        return out

    def close(self) -> None:
        self.sock.close()
