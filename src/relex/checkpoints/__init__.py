"""Where checkpoints come from: discovering a run's step directories (local or hub
branches) and choosing the base and the observed steps."""
