"""trtserve: a gRPC model server that reuses TensorRT engines across batch sizes."""

__version__ = "0.1.0"
