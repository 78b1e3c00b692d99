"""RoutingStore and RoutedExpertsReader: scatter by KV slot, gather, the step protocol, readers
in other processes, and (on CUDA) the asynchronous copy.

Legend: T tokens of a step, S KV slots, L MoE layers, K top_k.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time

import numpy as np
import pytest
import torch

from rollout.capture import (
    ReaderSpec,
    RoutedExpertsCapturer,
    RoutedExpertsReader,
    RoutingStore,
    shm,
)

PREFIX = f"{shm.SEGMENT_PREFIX}-{os.getpid()}-"
NUMPY = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32}
HIGH = {torch.uint8: 256, torch.int16: 32768, torch.int32: 2**31 - 1}


@pytest.fixture
def name() -> str:
    """A fresh segment name; after the test, no segment of this process may be left."""
    yield shm.segment_name(shm.new_instance_id(), 0)
    leftovers = [f for f in os.listdir("/dev/shm") if f.startswith(PREFIX)]
    for leftover in leftovers:
        os.unlink(os.path.join("/dev/shm", leftover))
    assert not leftovers, f"segments left behind: {leftovers}"


@pytest.fixture
def lock_path(tmp_path) -> str:
    return str(tmp_path / "shm.lock")


def _store(name, lock_path, *, slots=64, layers=3, top_k=2, rows=16, dtype=torch.int16):
    return RoutingStore(
        name=name,
        num_kv_slots=slots,
        num_moe_layers=layers,
        top_k=top_k,
        max_num_tokens=rows,
        device="cpu",
        dtype=dtype,
        lock_path=lock_path,
    )


def _random_step(rows_TLK_shape, dtype, num_slots, rng, *, padding=True):
    """Random rows [T, L, K] and a slot mapping of distinct slots, some -1 when ``padding``."""
    num_tokens = rows_TLK_shape[0]
    rows = torch.randint(0, HIGH[dtype], rows_TLK_shape, generator=rng, dtype=torch.int64)
    slots = torch.randperm(num_slots, generator=rng)[:num_tokens]
    if padding:
        slots[torch.rand(num_tokens, generator=rng) < 0.25] = -1
    return rows.to(dtype), slots.tolist()


# --------------------------------------------------------------------------------------------
# Scatter and gather
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_steps_scatter_by_slot_and_read_gathers(dtype, name, lock_path, rng):
    num_slots, layers, top_k, max_tokens = 64, 3, 2, 16
    capturer = RoutedExpertsCapturer(max_tokens, layers, top_k, device="cpu", dtype=dtype)
    expected: dict[int, np.ndarray] = {}
    with RoutingStore.for_capturer(
        capturer, name=name, num_kv_slots=num_slots, lock_path=lock_path
    ) as store:
        assert store.read([]).shape == (0, layers, top_k)
        for _ in range(12):
            num_tokens = int(torch.randint(0, max_tokens + 1, (), generator=rng))
            rows, slots = _random_step((num_tokens, layers, top_k), dtype, num_slots, rng)
            capturer.buffer[:num_tokens] = rows  # what the routing kernels write in a step
            store.after_forward(capturer.buffer, num_tokens, slots)
            written = store.commit()
            assert written == sum(s >= 0 for s in slots)
            for t, slot in enumerate(slots):
                if slot >= 0:
                    expected[slot] = rows[t].numpy()
        order = list(expected)
        np.random.default_rng(int(torch.randint(0, 2**31, (), generator=rng))).shuffle(order)
        got = store.read(order)
        assert got.dtype == NUMPY[dtype] and got.shape == (len(order), layers, top_k)
        np.testing.assert_array_equal(got, np.stack([expected[s] for s in order]))
        got[:] = 0  # a copy: the store is untouched
        np.testing.assert_array_equal(store.read(order[:1]), expected[order[0]][None])


def test_read_into_an_output_array(name, lock_path, rng):
    """``read(slots, out)`` gathers into ``out`` (the engine reads a request's rows straight
    into its output array); an ``out`` it cannot fill raises, naming it."""
    with _store(name, lock_path) as store:
        rows, slots = _random_step((16, 3, 2), torch.int16, 64, rng, padding=False)
        store.after_forward(rows, 16, slots)
        store.commit()
        out = np.full((20, 3, 2), -1, dtype=np.int16)
        assert store.read(slots[5:12], out=out[2:9]).base is out
        np.testing.assert_array_equal(out[2:9], rows[5:12].numpy())
        assert (out[:2] == -1).all() and (out[9:] == -1).all(), "wrote outside its rows"
        assert store.read([], out=out[:0]).shape == (0, 3, 2)
        for bad in (out[:6], out[:7].astype(np.int32), out[:7, :, :1], out[::2][:7]):
            with pytest.raises(ValueError, match=r"out: expected a C-contiguous int16 array"):
                store.read(slots[:7], out=bad)


def test_after_forward_snapshots_the_buffer(name, lock_path, rng):
    with _store(name, lock_path) as store:
        buffer = torch.zeros((16, 3, 2), dtype=torch.int16)
        rows, slots = _random_step((5, 3, 2), torch.int16, 64, rng, padding=False)
        buffer[:5] = rows
        store.after_forward(buffer, 5, np.array(slots))
        buffer.fill_(-1)  # the next step's routing rewrites the buffer before the commit
        store.commit()
        np.testing.assert_array_equal(store.read(slots), rows.numpy())


def test_commit_without_pending_copy_is_a_noop(name, lock_path, rng):
    with _store(name, lock_path) as store:
        buffer = torch.zeros((16, 3, 2), dtype=torch.int16)
        rows, slots = _random_step((4, 3, 2), torch.int16, 64, rng, padding=False)
        buffer[:4] = rows
        store.after_forward(buffer, 4, torch.tensor(slots))
        assert store.commit() == 4
        before = store.read(range(64))
        assert store.commit() == 0  # nothing pending
        buffer.fill_(7)
        store.after_forward(buffer, 0, [])  # an empty step
        assert store.commit() == 0
        store.after_forward(buffer, 3, [-1, -1, -1])  # only padding
        assert store.commit() == 0
        np.testing.assert_array_equal(store.read(range(64)), before)


def test_read_with_a_copy_pending_returns_the_committed_rows(name, lock_path, rng):
    """The engine runs one step ahead: a read of earlier rows must not wait for the pending
    copy, so ``read`` gives the committed rows, and the pending step's rows only after
    ``commit``."""
    with _store(name, lock_path) as store:
        buffer = torch.zeros((16, 3, 2), dtype=torch.int16)
        old_rows, slots = _random_step((6, 3, 2), torch.int16, 64, rng, padding=False)
        buffer[:6] = old_rows
        store.after_forward(buffer, 6, slots)
        store.commit()
        new_rows = old_rows.clone()
        while bool((new_rows == old_rows).all(-1).all(-1).any()):  # every row changes
            new_rows, _ = _random_step((6, 3, 2), torch.int16, 64, rng, padding=False)
        buffer[:6] = new_rows
        store.after_forward(buffer, 6, slots)  # the same slots, rewritten by the next step
        assert store.has_pending
        np.testing.assert_array_equal(store.read(slots), old_rows.numpy())
        assert store.commit() == 6 and not store.has_pending
        np.testing.assert_array_equal(store.read(slots), new_rows.numpy())


def test_step_protocol_errors(name, lock_path):
    store = _store(name, lock_path)
    buffer = torch.zeros((16, 3, 2), dtype=torch.int16)
    store.after_forward(buffer, 2, [0, 1])
    with pytest.raises(RuntimeError, match="call commit"):
        store.after_forward(buffer, 2, [2, 3])
    store.commit()
    store.close()
    assert not os.path.exists(f"/dev/shm/{name}")
    for call in (
        lambda: store.read([0]),
        store.commit,
        lambda: store.after_forward(buffer, 0, []),
    ):
        with pytest.raises(RuntimeError, match="is closed"):
            call()
    store.close()  # idempotent


def test_bad_arguments(name, lock_path):
    with _store(name, lock_path, slots=8) as store:
        buffer = torch.zeros((16, 3, 2), dtype=torch.int16)
        cases = [
            (ValueError, r"slot_mapping: expected shape \(2,\)", (buffer, 2, [0])),
            (ValueError, r"expected values in \[-1, 8\).*min -2", (buffer, 2, [0, -2])),
            (ValueError, r"expected values in \[-1, 8\).*max 8", (buffer, 2, [0, 8])),
            (ValueError, "slot_mapping: expected integers", (buffer, 2, [0.0, 1.0])),
            (
                ValueError,
                "slot_mapping: expected host data",
                (buffer, 1, torch.zeros(1, device="meta")),
            ),
            (
                ValueError,
                r"num_tokens: expected in \[0, 16\]",
                (buffer, 17, list(range(17))),
            ),
            (ValueError, r"num_tokens: expected in \[0, 4\]", (buffer[:4], 5, [0] * 5)),
            (TypeError, "num_tokens", (buffer, 1.0, [0])),
            (
                ValueError,
                "capture_buffer: expected dtype torch.int16",
                (buffer.int(), 1, [0]),
            ),
            (
                ValueError,
                r"capture_buffer: expected shape \[rows, 3, 2\]",
                (buffer[:, :2], 1, [0]),
            ),
            (TypeError, "capture_buffer", (buffer.numpy(), 1, [0])),
        ]
        for error, pattern, args in cases:
            with pytest.raises(error, match=pattern):
                store.after_forward(*args)
        assert store.commit() == 0  # nothing was enqueued by the failed calls
        for slots, pattern in [
            ([-1], r"slots: expected values in \[0, 8\)"),
            ([8], r"slots: expected values in \[0, 8\)"),
            ([[0]], "slots: expected a 1-D"),
            ([0.5], "slots: expected integers"),
        ]:
            with pytest.raises(ValueError, match=pattern):
                store.read(slots)
    with pytest.raises(ValueError, match="dtype: expected uint8, int16 or int32"):
        _store(name, lock_path, dtype=torch.float32)
    with pytest.raises(ValueError, match="num_kv_slots: expected >= 1"):
        _store(name, lock_path, slots=0)


# --------------------------------------------------------------------------------------------
# Lifetime and readers
# --------------------------------------------------------------------------------------------


def test_store_unlinks_its_segment_on_exception(name, lock_path):
    with pytest.raises(RuntimeError, match="engine died"), _store(name, lock_path):
        assert os.path.exists(f"/dev/shm/{name}")
        raise RuntimeError("engine died")
    assert not os.path.exists(f"/dev/shm/{name}")
    store = _store(name, lock_path)
    del store
    assert not os.path.exists(f"/dev/shm/{name}")


def test_reader_in_process_and_spec(name, lock_path, rng):
    with _store(name, lock_path, dtype=torch.uint8) as store:
        spec = store.reader_spec()
        assert spec == ReaderSpec(
            name=name, num_kv_slots=64, num_moe_layers=3, top_k=2, dtype="uint8"
        )
        assert pickle.loads(pickle.dumps(spec)) == spec
        buffer = torch.zeros((16, 3, 2), dtype=torch.uint8)
        rows, slots = _random_step((9, 3, 2), torch.uint8, 64, rng)
        buffer[:9] = rows
        store.after_forward(buffer, 9, slots)
        store.commit()
        kept = [s for s in slots if s >= 0]
        with RoutedExpertsReader.from_spec(spec) as reader:
            np.testing.assert_array_equal(reader.read(kept), store.read(kept))
        assert os.path.exists(f"/dev/shm/{name}")  # closing a reader never unlinks
        reader.close()  # idempotent
        with pytest.raises(RuntimeError, match="after close"):
            reader.read(kept)
        with pytest.raises(
            ValueError, match=r"shape \(128, 3, 2\) .* int16, got shape \(64, 3, 2\) uint8"
        ):
            RoutedExpertsReader(name, 128, 3, 2, np.int16)
    with pytest.raises(FileNotFoundError):
        RoutedExpertsReader.from_spec(spec)


def _read_in_child(spec: ReaderSpec, slots: list[int]) -> np.ndarray:
    with RoutedExpertsReader.from_spec(spec) as reader:
        return reader.read(slots)


def test_reader_in_a_spawned_process(name, lock_path, rng):
    with _store(name, lock_path, dtype=torch.int32, slots=128, layers=4, top_k=3) as store:
        buffer = torch.zeros((16, 4, 3), dtype=torch.int32)
        expected = {}
        for _ in range(3):
            rows, slots = _random_step((16, 4, 3), torch.int32, 128, rng)
            buffer[:] = rows
            store.after_forward(buffer, 16, slots)
            store.commit()
            expected.update({s: rows[t].numpy() for t, s in enumerate(slots) if s >= 0})
        order = list(expected)[::-1]
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            got = pool.apply(_read_in_child, (store.reader_spec(), order))
        np.testing.assert_array_equal(got, np.stack([expected[s] for s in order]))
        time.sleep(0.2)  # the child and its resource tracker are gone: the segment is not
        assert os.path.exists(f"/dev/shm/{name}")
        np.testing.assert_array_equal(store.read(order), got)


# --------------------------------------------------------------------------------------------
# CUDA: the asynchronous copy
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_async_copy_does_not_block_the_step(name, lock_path, rng):
    """The copy waits for the step on the device, not on the host: with a long kernel ahead
    of the capture writes, after_forward returns while the compute stream is still busy (a
    pageable staging buffer or a host sync would block until the kernel ends), and the rows
    that arrive are the step's (the copy is ordered after the writes and before the next
    step's overwrite)."""
    device = torch.device("cuda")
    capturer = RoutedExpertsCapturer(64, 3, 4, device=device, dtype=torch.int16)
    with RoutingStore.for_capturer(
        capturer, name=name, num_kv_slots=256, lock_path=lock_path
    ) as store:
        for _ in range(3):
            rows, slots = _random_step((48, 3, 4), torch.int16, 256, rng)
            rows_dev = rows.to(device)
            torch.cuda.synchronize()
            torch.cuda._sleep(1 << 28)  # ~0.1-0.3 s of device time on the compute stream
            capturer.buffer[:48].copy_(rows_dev)  # the step's routing writes, after it
            start = time.perf_counter()
            store.after_forward(capturer.buffer, 48, slots)
            elapsed = time.perf_counter() - start
            assert not torch.cuda.current_stream().query(), "after_forward waited for the step"
            capturer.buffer.fill_(-1)  # the next step's writes, enqueued before the commit
            store.commit()
            kept = [s for s in slots if s >= 0]
            keep = torch.tensor([s >= 0 for s in slots])
            np.testing.assert_array_equal(store.read(kept), rows[keep].numpy())
            assert elapsed < 0.05, f"after_forward took {elapsed:.3f} s"
