"""The runtime: the disk cache, the one launcher (load, prepare, launch, remember warm launches), weights in
the layout a kernel reads, devices, and the aten fallback. It runs what it is told; the ops choose."""
