"""ptqsuite: a pytest regression suite for post-training quantization of LLMs."""
__version__ = "0.1.0"
