"""μ0 dataset_builders."""
