"""The micro world (a procedural scene renderer) and the micro models trained on it."""
