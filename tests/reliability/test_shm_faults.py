"""Faults at a segment's creation and attachment (issue 13 sections 4 and 8): a full ``/dev/shm``
fails with an error naming the segment, its size and the free space and leaves nothing behind;
a reader expecting another store of the same byte size is refused.

The full ``/dev/shm`` is real: a store larger than the whole filesystem, whose page reservation
the kernel refuses at once (ENOSPC) without touching memory.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from rollout.capture import RoutedExpertsReader, RoutingStore, shm


@pytest.fixture
def name() -> str:
    name = shm.segment_name(shm.new_instance_id(), 0)
    yield name
    assert not os.path.exists(f"/dev/shm/{name}")


@pytest.fixture
def lock_path(tmp_path) -> str:
    return str(tmp_path / "shm.lock")


def test_full_dev_shm_names_segment_size_and_free_space_and_leaves_nothing(name, lock_path):
    vfs = os.statvfs("/dev/shm")
    total = vfs.f_blocks * vfs.f_frsize
    if total == 0:
        pytest.skip("/dev/shm has no size limit")
    layers, top_k = 4, 8
    slots = total // (layers * top_k * 2) + 1  # int16 rows: one slot more than fits at all
    nbytes = 4096 + slots * layers * top_k * 2  # with the header page
    entries = set(os.listdir("/dev/shm"))
    with pytest.raises(OSError) as failure:
        RoutingStore(
            name=name,
            num_kv_slots=slots,
            num_moe_layers=layers,
            top_k=top_k,
            max_num_tokens=8,
            device="cpu",
            lock_path=lock_path,
        )
    assert failure.value.errno == errno.ENOSPC
    message = str(failure.value)
    assert f"shared memory {name}: cannot reserve {nbytes} bytes in /dev/shm" in message
    assert "bytes free of" in message and f"of {total})" in message
    # Nothing behind: no file of that name, no new file at all of ours, no space held.
    assert not os.path.exists(f"/dev/shm/{name}")
    assert not {e for e in set(os.listdir("/dev/shm")) - entries if str(os.getpid()) in e}
    assert os.statvfs("/dev/shm").f_bavail * vfs.f_frsize > total // 2


@pytest.mark.parametrize(
    ("reader_shape", "reader_dtype"),
    [
        ((32, 3, 4), np.int16),  # same bytes, other shape
        ((64, 6, 1), np.int16),
        ((128, 3, 2), np.uint8),  # same bytes, other dtype
    ],
)
def test_reader_of_another_shape_with_the_same_bytes_is_refused(
    reader_shape, reader_dtype, name, lock_path, rng
):
    with RoutingStore(
        name=name,
        num_kv_slots=64,
        num_moe_layers=3,
        top_k=2,
        max_num_tokens=64,
        device="cpu",
        dtype=torch.int16,
        lock_path=lock_path,
    ) as store:
        rows = torch.randint(0, 1000, (64, 3, 2), generator=rng).to(torch.int16)
        store.after_forward(rows, 64, range(64))
        store.commit()
        with pytest.raises(ValueError, match=r"name: expected segment .* shape \(64, 3, 2\) int16"):
            RoutedExpertsReader(name, *reader_shape, reader_dtype)
        with RoutedExpertsReader.from_spec(store.reader_spec()) as reader:  # the right one
            np.testing.assert_array_equal(reader.read(range(64)), rows.numpy())


def test_attach_refuses_a_header_whose_size_does_not_match_the_file(name, lock_path):
    with shm.create(name, (64, 4), np.int32, lock_path=lock_path):
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
        try:
            os.ftruncate(fd, 4096 + 128)  # the file shrunk under its header (not by us)
        finally:
            os.close(fd)
        with pytest.raises(ValueError, match="another size than its header"):
            shm.attach(name)
