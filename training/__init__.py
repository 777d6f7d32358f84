"""μ0 training."""
