"""Per-model dynamic batching inside a worker: settings, the pure decision, and the thread-safe queue."""

from service.batching.batcher import Batch, DynamicBatcher, QueuedRequest
from service.batching.policy import DEFAULT_MAX_QUEUE_SIZE, BatcherSettings, Decision, decide

__all__ = ["DEFAULT_MAX_QUEUE_SIZE", "Batch", "BatcherSettings", "Decision", "DynamicBatcher",
           "QueuedRequest", "decide"]
