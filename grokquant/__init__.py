"""grokquant: convert, quantize, load and validate xAI's Grok 2 release."""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Our Grok 2 model with quantized linears, placed over GPUs and CPU memory (see grokquant.load)."""
    from grokquant.runtime.load import load as _load  # torch and the kernels load only when a model is asked for

    return _load(*args, **kwargs)
