"""Autotuning: search spaces (space), the tuner (tuner), the tuning database (database), the choice each op
asks for per call (choice) and the layer suites the CLI tunes and benchmarks (suites). It measures kernels
through the runtime's launcher; the ops above it ask it what to run."""
