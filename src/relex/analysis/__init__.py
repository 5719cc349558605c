"""Is the run predictable? Backtests from Gram matrices, the HTML report, following a
live run."""
