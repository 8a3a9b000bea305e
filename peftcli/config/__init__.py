"""Layer 1, config: strict YAML reading, the typed recipe sections and their validation. Imports nothing above it."""
