"""Autotuning, part of the runtime room: search spaces (space), the tuner (tuner), the tuning database
(database), the runtime's choice per call (choice) and the layer suites the CLI tunes and benchmarks (suites)."""
