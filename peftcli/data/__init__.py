"""Layer 2, data: reading rows from files or the hub, turning them into features per task, collating batches."""
