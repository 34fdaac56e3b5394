"""se_inject's benchmarks and coverage sweep (scripts, importable for the tests)."""
