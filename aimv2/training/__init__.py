"""Training: the Lightning module and data module, the optimizer recipe, the Trainer factory."""
