"""relex inside the training loop: the Accelerator that jumps in place, its cycle
snapshots and the rank's master shards per layout."""
