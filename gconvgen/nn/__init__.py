"""What a user calls: ``conv2d`` / ``conv1d`` (checked arguments, layouts, padding), the layers, the
decoding step, ``convert`` and ``fuse``. ``gconvgen`` re-exports the public names."""
