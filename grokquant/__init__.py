"""grokquant: convert, quantize, load and validate xAI's Grok 2 release."""

__version__ = "0.1.0"
