"""RLHF training with online merging: data checking, algorithms, and the glue to TRL."""
