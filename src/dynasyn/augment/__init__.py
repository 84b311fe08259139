"""Concept-based prompt-and-image augmentation (the paper's Steps 1-4)."""
