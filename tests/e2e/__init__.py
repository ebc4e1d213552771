"""End to end: real Linux guests (Debian kernels, busybox images) in real hv processes."""
