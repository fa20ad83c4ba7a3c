"""Device mesh and the data/tensor/pipeline parallel plans applied to a plain model."""
