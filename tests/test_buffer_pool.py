"""Buffer pool: growth (exact, geometric), views, the byte cap, and freeing only after in-flight work."""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import pytest

from service.errors import ResourceExhausted
from service.memory.allocators import Buffer, HostAllocator
from service.memory.pool import BufferPool, DeviceView, PoolTensor, split_poolable

F4 = np.dtype("<f4")
ROW_BYTES = 8192  # x and y: 1024 FP32 each, page multiples so allocated bytes = requested bytes


def make_pool(growth="exact", allocator=None, **kwargs) -> BufferPool:
    return BufferPool([PoolTensor("x", F4, (1024,))], [PoolTensor("y", F4, (1024,))], growth=growth,
                      allocator=allocator, **kwargs)


def test_two_input_sets_are_separate_memory_and_share_the_outputs():
    pool = make_pool(input_sets=2, max_pool_bytes=12 * ROW_BYTES)
    assert not pool.fits(1)
    sides = [pool.views(4, side) for side in (0, 1)]
    assert pool.fits(4) and not pool.fits(5)
    sides[0].inputs["x"][:] = 1.0
    sides[1].inputs["x"][:] = 2.0
    assert (sides[0].inputs["x"] == 1.0).all(), "filling one side's inputs must not touch the other's"
    assert sides[0].outputs["y"].ctypes.data == sides[1].outputs["y"].ctypes.data
    x_bytes = ROW_BYTES // 2
    assert pool.bytes_by_memory()["host"] == 4 * (2 * x_bytes + x_bytes)  # two x sets, one y set
    with pytest.raises(ResourceExhausted):  # 9 rows need 9 * 3 half-rows: over the 12-row cap of x and y
        pool.views(9, side=1)
    assert pool.views(8, side=1).inputs["x"].shape == (8, 1024) and pool.fits(8)
    with pytest.raises(ValueError, match="side"):
        pool.views(1, side=2)
    with pytest.raises(ValueError, match="input_sets"):
        make_pool(input_sets=3)


@pytest.mark.parametrize("growth,batches,rows", [
    ("exact", [1, 2, 3, 5, 9, 4, 0], [1, 2, 3, 5, 9, 9, 9]),
    ("geometric", [1, 2, 3, 5, 9, 4, 0], [1, 2, 4, 8, 16, 16, 16]),
    ("geometric", [3, 4, 20], [3, 6, 20]),
])
def test_growth(growth, batches, rows):
    pool = make_pool(growth)
    grows = 0
    for batch, expected in zip(batches, rows, strict=True):
        before = pool.capacity_rows
        bufs = pool.views(batch)
        grows += expected != before
        assert bufs.inputs["x"].shape == (batch, 1024) and bufs.outputs["y"].shape == (batch, 1024)
        assert pool.capacity_rows == expected and pool.grows == grows
        assert pool.bytes_by_memory() == {"host": expected * ROW_BYTES, "pinned": 0, "device": 0}


def test_geometric_growth_is_capped_by_max_rows_and_by_the_byte_cap():
    pool = make_pool("geometric", max_rows=12)
    for batch in [8, 9]:
        pool.views(batch)
    assert pool.capacity_rows == 12  # not 16
    pool.views(13)
    assert pool.capacity_rows == 13  # a batch above max_rows still gets its rows
    pool = make_pool("geometric", max_pool_bytes=6 * ROW_BYTES)
    pool.views(4)
    pool.views(5)
    assert pool.capacity_rows == 6  # 8 would not fit the cap: the most that does


def test_views_share_the_pool_memory_and_are_page_aligned():
    pool = make_pool()
    big = pool.views(4)
    small = pool.views(2)
    assert pool.grows == 1
    assert np.shares_memory(big.inputs["x"], small.inputs["x"])
    assert not np.shares_memory(small.inputs["x"], small.outputs["y"])
    small.inputs["x"][...] = 7
    assert (big.inputs["x"][:2] == 7).all()
    for view in (small.inputs["x"], small.outputs["y"]):
        assert view.ctypes.data % mmap.PAGESIZE == 0 and view.flags.c_contiguous and view.dtype == F4
    assert small.device_inputs == {} and small.device_outputs == {}
    small.upload()  # no-ops on a host pool
    small.download()


def test_batch_zero_allocates_nothing():
    pool = make_pool()
    bufs = pool.views(0)
    assert bufs.rows == 0 and bufs.inputs["x"].shape == (0, 1024)
    assert pool.bytes_by_memory()["host"] == 0 and pool.grows == 0 and pool.capacity_rows == 0


def test_small_rows_are_rounded_to_pages():
    pool = BufferPool([PoolTensor("a", F4, (4,))], [PoolTensor("b", np.dtype("<i8"), (2, 3))])
    pool.views(3)
    assert pool.bytes_by_memory()["host"] == 2 * mmap.PAGESIZE
    assert pool.bytes_for(1000) == 4 * mmap.PAGESIZE + 12 * mmap.PAGESIZE  # 16000 and 48000 bytes


def test_cap_rejects_a_batch_that_does_not_fit_and_smaller_batches_keep_working():
    pool = make_pool(max_pool_bytes=5 * ROW_BYTES, model="mlp")
    pool.views(5).inputs["x"][...] = 1
    with pytest.raises(ResourceExhausted) as info:
        pool.views(6)
    message = info.value.message
    assert "model 'mlp'" in message and "max_pool_bytes cap of 40960" in message and "needs 49152 bytes" in message
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert pool.capacity_rows == 5 and pool.grows == 1 and pool.bytes_by_memory()["host"] == 5 * ROW_BYTES
    bufs = pool.views(3)
    assert (bufs.inputs["x"] == 1).all()  # the same buffers as before the refused batch
    bufs.outputs["y"][...] = bufs.inputs["x"] * 2
    assert (bufs.outputs["y"] == 2).all()


class RecordingAllocator(HostAllocator):
    """A real host allocator that logs calls and can fail the n-th allocation (simulated OOM)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.log: list[str] = []
        self.allocations = 0
        self.fail_at = fail_at

    def allocate(self, nbytes: int) -> Buffer:
        self.allocations += 1
        if self.allocations == self.fail_at:
            raise ResourceExhausted(f"simulated out of memory allocating {nbytes} bytes")
        self.log.append(f"allocate {nbytes}")
        return super().allocate(nbytes)

    def free(self, buf: Buffer) -> None:
        self.log.append(f"free {buf.nbytes}")
        super().free(buf)

    def sync(self) -> None:
        self.log.append("sync")


def test_growth_frees_old_buffers_only_after_sync():
    alloc = RecordingAllocator()
    pool = make_pool(allocator=alloc)
    pool.views(1)
    pool.views(2)
    assert alloc.log == ["allocate 4096", "allocate 4096",
                         "allocate 8192", "allocate 8192", "sync", "free 4096", "free 4096"]
    pool.close()
    assert alloc.log[-3:] == ["sync", "free 8192", "free 8192"] and pool.bytes_by_memory()["host"] == 0


def test_failed_growth_frees_the_partial_allocation_and_keeps_the_old_buffers():
    alloc = RecordingAllocator(fail_at=4)  # the second tensor of the second growth
    pool = make_pool(allocator=alloc)
    pool.views(2).inputs["x"][...] = 3
    with pytest.raises(ResourceExhausted, match="simulated out of memory"):
        pool.views(4)
    assert alloc.log[-2:] == ["allocate 16384", "free 16384"]
    assert pool.capacity_rows == 2 and pool.grows == 1
    assert (pool.views(2).inputs["x"] == 3).all()


def test_views_taken_before_a_growth_stay_readable_on_the_host():
    pool = make_pool()
    old = pool.views(1)
    old.inputs["x"][...] = 5
    pool.views(8)
    assert (old.inputs["x"] == 5).all()  # the mapping lives while a view does: no use after free


def test_slice_cuts_every_view_without_copying():
    pool = make_pool()
    bufs = pool.views(6)
    bufs.inputs["extra"] = np.arange(6)  # an unpooled input the caller adds
    part = bufs.slice(2, 5)
    assert part.rows == 3 and part.inputs["x"].shape == (3, 1024) and list(part.inputs["extra"]) == [2, 3, 4]
    assert np.shares_memory(part.outputs["y"], bufs.outputs["y"])
    assert part.outputs["y"].ctypes.data == bufs.outputs["y"].ctypes.data + 2 * 4096


def test_device_view_rows():
    view = DeviceView(0x10000, F4, (8, 2, 3), 0)
    assert view.nbytes == 8 * 24
    part = view[3:5]
    assert (part.ptr, part.shape, part.nbytes) == (0x10000 + 72, (2, 2, 3), 48)
    assert view[6:20].shape == (2, 2, 3) and view[5:2].shape == (0, 2, 3)


@dataclass
class Spec:
    name: str
    datatype: str
    dims: tuple[int, ...]


def test_split_poolable():
    pooled, unpooled = split_poolable(
        [Spec("a", "FP32", (3, 4)), Spec("s", "BYTES", (1,)), Spec("v", "INT64", (-1,)), Spec("h", "FP16", ())]
    )
    assert pooled == [PoolTensor("a", F4, (3, 4)), PoolTensor("h", np.dtype("<f2"), ())]
    assert unpooled == ["s", "v"]
    assert [t.row_bytes for t in pooled] == [48, 2]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_pool("sometimes")
    with pytest.raises(ValueError):
        make_pool().views(-1)
    with pytest.raises(ValueError, match="duplicate"):
        BufferPool([PoolTensor("x", F4, (1,))], [PoolTensor("x", F4, (1,))])


@pytest.mark.gpu
def test_cuda_pool_round_trip_and_device_bytes_match_cuda():
    rt = pytest.importorskip("cuda.bindings.runtime")
    from service.memory.allocators import CudaAllocator

    def free_bytes() -> int:
        err, free, _ = rt.cudaMemGetInfo()
        assert err == rt.cudaError_t.cudaSuccess
        return free

    alloc = CudaAllocator(0)
    big = 64 << 20  # rows of 64 MiB: far above the driver's 2 MiB allocation granularity
    pool = BufferPool([PoolTensor("x", np.dtype(np.uint8), (big,))], [PoolTensor("y", np.dtype(np.uint8), (big,))],
                      growth="exact", allocator=alloc)
    before = free_bytes()
    bufs = pool.views(2)
    held = pool.bytes_by_memory()
    assert held == {"host": 0, "pinned": 4 * big, "device": 4 * big}
    taken = before - free_bytes()
    assert abs(taken - held["device"]) <= 4 * (2 << 20), (taken, held)
    x = np.random.default_rng(0).integers(0, 255, (2, big), dtype=np.uint8)
    bufs.inputs["x"][...] = x
    bufs.upload()
    dx, dy = bufs.device_inputs["x"], bufs.device_outputs["y"]
    assert rt.cudaMemcpyAsync(dy.ptr, dx.ptr, dx.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                              alloc.stream)[0] == rt.cudaError_t.cudaSuccess
    bufs.download()
    np.testing.assert_array_equal(bufs.outputs["y"], x)
    pool.views(3)  # grows: old device buffers freed after a stream sync
    assert abs((before - free_bytes()) - 6 * big) <= 4 * (2 << 20)
    pool.close()
    assert abs(before - free_bytes()) <= 4 * (2 << 20)
    alloc.close()
