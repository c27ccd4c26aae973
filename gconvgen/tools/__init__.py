"""The command line (``gconvgen``), benchmarks, the sm_90 inspector and the model-level tune and report."""
