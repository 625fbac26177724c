"""bpfsys batch commands: a map whose type (or kernel) lacks them falls back to one
command per element, from the element the batch stopped at; absent keys do not stop a
batch delete. The kernel side is exercised by the eBPF integration tests."""

from __future__ import annotations

import errno

import pytest

from agent.dataplane.ebpf import bpfsys


class FakeMap(bpfsys.Map):
    def __init__(self, batch: bool, fail_at: int = 0) -> None:  # no fd: the commands are faked
        self.fd, self.name, self.percpu, self.batch_ok = -1, "fake", False, None
        self.key_size = self.value_size = self._vsize = 4
        self.batch, self.fail_at = batch, fail_at
        self.data: dict[bytes, bytes] = {}
        self.batches = 0

    def _batch(self, cmd: int, keys: bytes, values: bytes | None, count: int, flags: int) -> int:
        ks = [keys[i * 4 : i * 4 + 4] for i in range(count)]
        if not self.batch:
            e = bpfsys.BpfError(bpfsys.ENOTSUPP, "not supported")
            e.done = 0  # type: ignore[attr-defined]
            raise e
        self.batches += 1
        for i, k in enumerate(ks):
            if cmd == bpfsys.MAP_DELETE_BATCH:
                if k not in self.data:
                    e = bpfsys.BpfError(errno.ENOENT, "absent")
                    e.done = i  # type: ignore[attr-defined]
                    raise e
                del self.data[k]
            else:
                assert values is not None
                self.data[k] = values[i * 4 : i * 4 + 4]
        return count

    def update(self, key: bytes, value: bytes, flags: int = bpfsys.BPF_ANY) -> None:
        self.data[key] = value

    def delete(self, key: bytes) -> bool:
        return self.data.pop(key, None) is not None


ITEMS = [(i.to_bytes(4, "little"), (i * 7).to_bytes(4, "little")) for i in range(10_000)]


@pytest.mark.parametrize("batch", [True, False])
def test_update_and_delete_many(batch: bool) -> None:
    m = FakeMap(batch)
    m.update_many(ITEMS)
    assert m.data == dict(ITEMS)
    assert m.batch_ok is batch
    assert m.batches == (3 if batch else 0)  # 4096 per command
    # absent keys (already deleted) among the ones to delete: skipped, the rest deleted
    m.delete_many([k for k, _ in ITEMS[:5]] + [b"\xff\xff\xff\xff"] + [k for k, _ in ITEMS[:9000]])
    assert m.data == dict(ITEMS[9000:])


@pytest.mark.parametrize("batch", [True, False])
def test_update_packed_is_update_many(batch: bool) -> None:
    m = FakeMap(batch)
    m.update_packed(b"".join(k for k, _ in ITEMS), b"".join(v for _, v in ITEMS))
    assert m.data == dict(ITEMS) and m.batches == (3 if batch else 0)
    with pytest.raises(ValueError):
        m.update_packed(b"\0" * 8, b"\0" * 4)  # two keys, one value


def test_a_real_error_in_a_batch_is_raised() -> None:
    class Full(FakeMap):
        def _batch(self, cmd: int, keys: bytes, values: bytes | None, count: int, flags: int) -> int:
            e = bpfsys.BpfError(errno.E2BIG, "full")
            e.done = 3  # type: ignore[attr-defined]
            raise e

    with pytest.raises(bpfsys.BpfError) as info:
        Full(True).update_many(ITEMS[:10])
    assert info.value.errno == errno.E2BIG
