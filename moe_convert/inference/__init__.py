"""Inference: the runtime (generate), CPU kernels (oneDNN, native), decode, expert parallelism, bench."""
