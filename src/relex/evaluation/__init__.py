"""Scoring models: datasets, grading (math-verify), generation, pass@k, and sweeps over
extrapolated targets."""
