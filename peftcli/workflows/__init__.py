"""Layer 7, workflows: each command as a top-to-bottom script over the layers below (train, eval, merge-export...)."""
