"""The map layouts (agent/dataplane/ebpf/layout.py): the comparison the loader makes with
the C structs, and keys and values packed byte for byte as the C side reads them."""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

from agent.dataplane.ebpf import layout


def test_identical_layouts_agree_and_every_difference_is_named() -> None:
    assert layout.check(dict(layout.MAPS)) == []

    class Narrow(ctypes.Structure):  # struct port_val with a u16 counter
        _fields_ = [("counter", ctypes.c_uint16), ("verdict", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 5)]

    class Shifted(ctypes.Structure):  # same size, fields moved
        _fields_ = [("l3", ctypes.c_uint8), ("pad", ctypes.c_uint8), ("hook_dir", ctypes.c_uint8 * 2),
                    ("ep_id", ctypes.c_uint32)]

    tables = dict(layout.MAPS)
    tables["ports"] = (layout.PortKey, Narrow)
    tables["ifcfg"] = (layout.HalfKey, Shifted)
    tables["rule_stats"] = (ctypes.c_uint64, layout.Stat)
    del tables["counterinfo"]
    tables["extra"] = (ctypes.c_uint32, ctypes.c_uint32)
    errors = layout.check(tables)
    assert any(e.startswith("ports value field counter") and "size 2 in C" in e for e in errors)
    assert any(e.startswith("ifcfg value field hook_dir") for e in errors)
    assert "rule_stats key: 8 bytes in C, 4 in layout.py" in errors
    assert "counterinfo: no such map in the C source" in errors
    assert "extra: map not described in layout.py" in errors


def test_keys_and_values_are_packed_as_the_c_structs() -> None:
    ip = ipaddress.ip_address("10.0.0.2")
    assert layout.k_addr(ip, 1) == struct.pack("<BB2x", 4, 1) + ip.packed.ljust(16, b"\0")
    assert layout.k_half(7, 1) == struct.pack("<II", 7, 1)
    assert layout.v_epstate(3, 1, 3) == struct.pack("<IBB2xI", 3, 1, 3, 0)
    assert layout.v_epstate(3, 1, 3, 17) == struct.pack("<IBB2xI", 3, 1, 3, 17)
    assert layout.k_peer(5, 2, 1, 4, int(ip), 24) == struct.pack("<IIIBB", 104, 5, 2, 1, 4) + ip.packed + bytes(12)
    assert layout.k_port(5, 2, 3, 0, 6, 1, 8080, 16) == struct.pack("<IIIIBBB", 136, 5, 2, 3, 0, 6, 1) + \
        struct.pack(">H", 8080)
    assert layout.k_port(5, 2, 3, 0, 1, 0, 0, 16)[:4] == struct.pack("<I", 136)  # no port: whole key
    assert layout.v_port(9, 2) == struct.pack("<IB3x", 9, 2)
    assert layout.v_config(True, 10.0, 20, 0x2000, "stack") == struct.pack("<IIQII", 1, 20, 100_000_000, 0x2000, 0)
    assert layout.v_config(True, 10.0, 20, 0x2000, "peer") == struct.pack("<IIQII", 1, 20, 100_000_000, 0x2000, 1)
    info = struct.pack("<IB", 3, 1) + bytes.fromhex("a1b2c3d4e5f6") + b"\0"
    assert layout.v_counter_info(3, 1, "a1b2c3d4e5f6") == info
    assert layout.counter_owner(layout.v_counter_info(3, 1, "a1b2c3d4e5f6")) == (3, 1, "a1b2c3d4e5f6")
    assert layout.stat_sum([struct.pack("<QQ", 1, 60), struct.pack("<QQ", 2, 100)]) == (3, 160)
    for t in (layout.PeerKey, layout.PortKey):  # LPM keys: packed, as in C
        assert ctypes.sizeof(t) == {layout.PeerKey: 30, layout.PortKey: 21}[t]


def test_struct_packed_items_equal_the_ctypes_structures() -> None:
    """k_peer, k_port and v_port pack with struct for speed: the same bytes as the ctypes
    structures the C layout is checked against."""
    for fam, addr, plen in ((4, int(ipaddress.ip_address("10.1.2.3")), 32), (4, 0, 0),
                            (6, int(ipaddress.ip_address("fd00::1:5")), 127)):
        raw = addr.to_bytes(4 if fam == 4 else 16, "big")
        want = bytes(layout.PeerKey(80 + plen, 7, 9, 1, fam, layout.addr16(raw)))
        assert layout.k_peer(7, 9, 1, fam, addr, plen) == want
    for has_port, port, plen in ((1, 8080, 16), (1, 0, 1), (0, 0, 16), (1, 65535, 16)):
        prefixlen = 120 + plen if has_port else 136
        want = bytes(layout.PortKey(prefixlen, 3, 4, 5, 1, layout.P_TCP, has_port, socket.htons(port)))
        assert layout.k_port(3, 4, 5, 1, layout.P_TCP, has_port, port, plen) == want
    assert layout.v_port(0xABCDEF, layout.V_DROP) == bytes(layout.PortValue(0xABCDEF, layout.V_DROP))
