"""Layer 5, training: the Trainer subclass, optimizer groups, importance scores, metrics, checkpoints, stops."""
