"""μ0 model_cards."""
