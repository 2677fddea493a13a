"""Frozen-trunk probing: freeze a pre-trained encoder, train a grid of classification heads on it
(one forward pass feeds them all), pick the best head on the validation split."""
