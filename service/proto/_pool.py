"""The private descriptor pool that trtserve's generated protobuf code registers into.

Triton's client library registers messages with the same full names (package `inference`) in
protobuf's default pool; a private pool lets both live in one process (tests, in-process tools).
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
