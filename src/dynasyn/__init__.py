"""dynasyn: DynASyn multi-subject personalization (AAAI 2025) on Hugging Face diffusers."""

__version__ = "0.1.0"
