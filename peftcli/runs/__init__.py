"""Layer 6, runs: the run folder once written: reading it back, reports, export and comparison."""
