"""The per-model buffer pool and its allocators (host; CUDA device + pinned, imported lazily)."""

from service.memory.allocators import Allocator, Buffer, CudaAllocator, HostAllocator
from service.memory.pool import BufferPool, BufferSet, DeviceView, PoolTensor, split_poolable

__all__ = [
    "Allocator", "Buffer", "BufferPool", "BufferSet", "CudaAllocator", "DeviceView", "HostAllocator",
    "PoolTensor", "split_poolable",
]
