"""A minimal ctypes binding of the bpf(2) syscall for pinned maps and programs.

The long-lived agent manages the kernel objects the short-lived loader child pinned
(`agent.dataplane.ebpf.loader`) through these few commands, so it never imports bcc
and never carries LLVM. Keys and values are raw bytes; callers pack them with the
structures of `agent.dataplane.ebpf.layout`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from collections.abc import Iterator

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

# bpf_cmd
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
OBJ_PIN = 6
OBJ_GET = 7
OBJ_GET_INFO_BY_FD = 15
MAP_LOOKUP_AND_DELETE_ELEM = 21
MAP_LOOKUP_BATCH = 24
MAP_UPDATE_BATCH = 26
MAP_DELETE_BATCH = 27

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_FS_MAGIC = 0xCAFE4A11
BATCH = 4096  # elements per batch command
ENOTSUPP = 524  # the kernel's own "operation not supported" (batch commands a map type lacks)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    pass


def _bpf(cmd: int, attr: ctypes.Array) -> int:  # type: ignore[type-arg]
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(2) syscall number unknown for {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        e = ctypes.get_errno()
        raise BpfError(e, os.strerror(e))
    return int(ret)


def _attr() -> ctypes.Array:  # type: ignore[type-arg]
    """A zeroed bpf_attr (128 bytes covers every command used here)."""
    return ctypes.create_string_buffer(128)


def _put(buf: ctypes.Array, offset: int, ctype: type, value: int) -> None:  # type: ignore[type-arg]
    ctype.from_buffer(buf, offset).value = value  # type: ignore[attr-defined]


def _addr(b: ctypes.Array | None) -> int:  # type: ignore[type-arg]
    return 0 if b is None else ctypes.addressof(b)


def obj_get(path: str) -> int:
    """fd of a pinned map or program."""
    attr = _attr()
    p = ctypes.create_string_buffer(path.encode())
    _put(attr, 0, ctypes.c_uint64, ctypes.addressof(p))
    return _bpf(OBJ_GET, attr)


def obj_pin(fd: int, path: str) -> None:
    attr = _attr()
    p = ctypes.create_string_buffer(path.encode())
    _put(attr, 0, ctypes.c_uint64, ctypes.addressof(p))
    _put(attr, 8, ctypes.c_uint32, fd)
    _bpf(OBJ_PIN, attr)


def _info(fd: int, size: int = 256) -> bytes:
    info = ctypes.create_string_buffer(size)
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, fd)
    _put(attr, 4, ctypes.c_uint32, size)
    _put(attr, 8, ctypes.c_uint64, ctypes.addressof(info))
    _bpf(OBJ_GET_INFO_BY_FD, attr)
    return info.raw


def prog_id(fd: int) -> int:
    """Kernel id of a program (bpf_prog_info.id)."""
    return int.from_bytes(_info(fd)[4:8], "little")


def _ncpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


NCPUS = _ncpus()
PERCPU_TYPES = {5, 6, 10, 21}  # percpu hash, percpu array, lru percpu hash, percpu cgroup storage


def is_bpffs(path: str) -> bool:
    # statvfs has no f_type: find the mount holding `path` in /proc/self/mounts.
    real = os.path.realpath(path)
    best = ("", "")
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt, typ = parts[1], parts[2]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, typ)
    return best[1] == "bpf"


class Map:
    """A BPF map opened by fd (usually from a pinned path)."""

    def __init__(self, fd: int, name: str = "") -> None:
        self.fd = fd
        raw = _info(fd)
        self.type, self.id, self.key_size, self.value_size, self.max_entries, self.flags = (
            int.from_bytes(raw[i : i + 4], "little") for i in range(0, 24, 4)
        )
        self.name = name or raw[24:40].rstrip(b"\0").decode()
        self.percpu = self.type in PERCPU_TYPES
        self._vsize = ((self.value_size + 7) // 8 * 8) * NCPUS if self.percpu else self.value_size
        self.batch_ok: bool | None = None  # whether batch commands work on this map (None: untried)

    @classmethod
    def pinned(cls, path: str) -> Map:
        return cls(obj_get(path), os.path.basename(path))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _elem(self, cmd: int, key: bytes | None, value: ctypes.Array | None, flags: int = 0) -> int:  # type: ignore[type-arg]
        """One element command; `key` None for the commands of keyless maps (queues)."""
        k = None
        if key is not None:
            if len(key) != self.key_size:
                raise ValueError(f"{self.name}: key is {len(key)} bytes, map wants {self.key_size}")
            k = ctypes.create_string_buffer(key, len(key))
        attr = _attr()
        _put(attr, 0, ctypes.c_uint32, self.fd)
        _put(attr, 8, ctypes.c_uint64, _addr(k))
        _put(attr, 16, ctypes.c_uint64, _addr(value))
        _put(attr, 24, ctypes.c_uint64, flags)
        return _bpf(cmd, attr)

    def _found(self, cmd: int, key: bytes | None, value: ctypes.Array | None) -> bool:  # type: ignore[type-arg]
        """An element command on an element that may be absent (ENOENT: False)."""
        try:
            self._elem(cmd, key, value)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def lookup(self, key: bytes) -> bytes | None:
        v = ctypes.create_string_buffer(self._vsize)
        return v.raw if self._found(MAP_LOOKUP_ELEM, key, v) else None

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        step = (self.value_size + 7) // 8 * 8
        return [raw[i * step : i * step + self.value_size] for i in range(NCPUS)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if self.percpu and len(value) == self.value_size:
            step = (self.value_size + 7) // 8 * 8
            value = b"".join(value.ljust(step, b"\0") for _ in range(NCPUS))
        if len(value) != self._vsize:
            raise ValueError(f"{self.name}: value is {len(value)} bytes, map wants {self._vsize}")
        v = ctypes.create_string_buffer(value, len(value))
        self._elem(MAP_UPDATE_ELEM, key, v, flags)

    def delete(self, key: bytes) -> bool:
        return self._found(MAP_DELETE_ELEM, key, None)

    def _batch(self, cmd: int, keys: bytes, values: bytes | None, count: int, flags: int) -> int:
        """One batch command over `count` packed keys (and values): how many it did (on
        failure, raised with `done` set to those done before the failing element)."""
        k = ctypes.create_string_buffer(keys, len(keys))
        v = None if values is None else ctypes.create_string_buffer(values, len(values))
        attr = _attr()
        _put(attr, 16, ctypes.c_uint64, ctypes.addressof(k))
        _put(attr, 24, ctypes.c_uint64, _addr(v))
        _put(attr, 32, ctypes.c_uint32, count)
        _put(attr, 36, ctypes.c_uint32, self.fd)
        _put(attr, 40, ctypes.c_uint64, flags)
        try:
            _bpf(cmd, attr)
        except BpfError as e:
            e.done = ctypes.c_uint32.from_buffer(attr, 32).value  # type: ignore[attr-defined]
            raise
        return count

    def update_many(self, items: list[tuple[bytes, bytes]], flags: int = BPF_ANY) -> None:
        """Update every item, in batches of at most `BATCH` (one syscall each) where the
        kernel supports it for this map, else one by one. Stops at the first failure."""
        if self.percpu or not items:  # per-CPU values: the single path replicates them
            for k, v in items:
                self.update(k, v, flags)
            return
        self.update_packed(b"".join(k for k, _ in items), b"".join(v for _, v in items), flags)

    def update_packed(self, keys: bytes, values: bytes, flags: int = BPF_ANY) -> None:
        """`update_many` of keys and values each laid end to end (no object per entry)."""
        ks, vs = self.key_size, self._vsize
        count = len(keys) // ks
        if len(keys) != count * ks or len(values) != count * vs or self.percpu:
            raise ValueError(f"{self.name}: {len(keys)} key bytes and {len(values)} value bytes are not "
                             f"whole entries of {ks} and {vs} bytes")
        for i in range(0, count, BATCH):
            n = min(BATCH, count - i)
            kpart, vpart = keys[i * ks:(i + n) * ks], values[i * vs:(i + n) * vs]
            start = 0
            if self.batch_ok is not False:
                try:
                    self._batch(MAP_UPDATE_BATCH, kpart, vpart, n, flags)
                    self.batch_ok = True
                    continue
                except BpfError as e:
                    if e.errno not in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP) or self.batch_ok:
                        raise
                    self.batch_ok = False  # not for this map type (or kernel): one by one
                    start = getattr(e, "done", 0)
            for j in range(start, n):
                self.update(kpart[j * ks:(j + 1) * ks], vpart[j * vs:(j + 1) * vs], flags)

    def delete_many(self, keys: list[bytes]) -> None:
        """Delete every key (absent ones ignored), in batches where supported."""
        for i in range(0, len(keys), BATCH):
            part = keys[i : i + BATCH]
            while part and self.batch_ok is not False:
                try:
                    self._batch(MAP_DELETE_BATCH, b"".join(part), None, len(part), 0)
                    part = []
                except BpfError as e:
                    done = getattr(e, "done", 0)
                    if e.errno == errno.ENOENT:  # already gone: skip it, go on with the rest
                        part = part[done + 1 :]
                        continue
                    if e.errno not in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP) or self.batch_ok:
                        raise
                    self.batch_ok = False
                    part = part[done:]
            for k in part:
                self.delete(k)

    def pop(self) -> bytes | None:
        """Take the oldest value of a queue map (None: empty)."""
        v = ctypes.create_string_buffer(self.value_size)
        return v.raw if self._found(MAP_LOOKUP_AND_DELETE_ELEM, None, v) else None

    def all_keys(self) -> Iterator[bytes]:
        attr = _attr()
        nxt = ctypes.create_string_buffer(self.key_size)
        cur: ctypes.Array | None = None  # type: ignore[type-arg]
        while True:
            _put(attr, 0, ctypes.c_uint32, self.fd)
            _put(attr, 8, ctypes.c_uint64, _addr(cur))
            _put(attr, 16, ctypes.c_uint64, ctypes.addressof(nxt))
            try:
                _bpf(MAP_GET_NEXT_KEY, attr)
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            k = nxt.raw
            yield k
            cur = ctypes.create_string_buffer(k, len(k))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for k in list(self.all_keys()):
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def dump(self) -> list[tuple[bytes, bytes]]:
        """Every (key, value), read in batches of `BATCH` (one syscall each) where the kernel
        supports it for this map, else one by one (`items`). Not for per-CPU maps."""
        return [kv for batch in self.scan() for kv in batch]

    def scan(self) -> Iterator[list[tuple[bytes, bytes]]]:
        """`dump` a batch at a time (a caller keeping only some entries never holds them all)."""
        ks, vs = self.key_size, self.value_size
        for keys, values in self.scan_packed():
            yield [(keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs]) for i in range(len(keys) // ks)]

    def scan_packed(self) -> Iterator[tuple[bytes, bytes]]:
        """`scan` as (keys, values) of each batch laid end to end, in the order the map
        lists them (no object per entry)."""
        if self.percpu:
            raise ValueError(f"{self.name}: dump reads single values, not per-CPU ones")
        ks, vs = self.key_size, self.value_size
        keys = ctypes.create_string_buffer(ks * BATCH)
        values = ctypes.create_string_buffer(vs * BATCH)
        cursor = [ctypes.create_string_buffer(ks), ctypes.create_string_buffer(ks)]
        first = True
        while True:
            attr = _attr()
            _put(attr, 0, ctypes.c_uint64, 0 if first else ctypes.addressof(cursor[0]))
            _put(attr, 8, ctypes.c_uint64, ctypes.addressof(cursor[1]))
            _put(attr, 16, ctypes.c_uint64, ctypes.addressof(keys))
            _put(attr, 24, ctypes.c_uint64, ctypes.addressof(values))
            _put(attr, 32, ctypes.c_uint32, BATCH)
            _put(attr, 36, ctypes.c_uint32, self.fd)
            done = False
            try:
                _bpf(MAP_LOOKUP_BATCH, attr)
            except BpfError as e:
                if e.errno != errno.ENOENT:  # ENOENT: the last batch (maybe empty)
                    if first and e.errno in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP):
                        break  # not for this map type (or kernel): one by one below
                    raise
                done = True
            n = ctypes.c_uint32.from_buffer(attr, 32).value
            yield keys.raw[:n * ks], values.raw[:n * vs]
            if done:
                return
            first = False
            cursor.reverse()  # this batch's end is the next one's start
        items = list(self.items())
        yield b"".join(k for k, _ in items), b"".join(v for _, v in items)

    def count(self) -> int:
        return sum(1 for _ in self.all_keys())
