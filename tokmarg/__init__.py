"""tokmarg: calibrated per-category confidence for generative LLM safety classifiers."""

__version__ = "0.1.0"
