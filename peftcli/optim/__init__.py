"""Optimizer construction: rule-based LR groups (and importance-scored LR scaling)."""
