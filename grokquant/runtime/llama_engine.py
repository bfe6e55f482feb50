"""Opening a GGUF in llama.cpp (llama-cpp-python) the way every grokquant command does.

One place for the options that matter when our numbers are compared with llama.cpp's, and for a
workaround: on CPUs with AMX-INT8 (Sapphire Rapids and later) llama.cpp puts quantized weights into
its AMX buffer type, and `ggml_backend_amx_mul_mat` then segfaults on the first product
(llama.cpp issue #20824, reproduced here with llama-cpp-python 0.3.36 on every quantized type). We
keep the weights in ordinary CPU buffers there: the same results, computed by the AVX-512 kernels.
"""

from __future__ import annotations

import functools

from grokquant.errors import GrokquantError

# f32 KV cache, so the cache adds no rounding of its own; yarn_* = -1 so the file's own YaRN keys count
EXACT = dict(type_k=0, type_v=0, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0, yarn_attn_factor=-1.0)


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise GrokquantError("the llama.cpp engine needs llama-cpp-python (pip install 'grokquant[llama]')") from None
    return llama_cpp


@functools.cache
def amx_buffers_crash() -> bool:
    """True where this llama.cpp build would use its AMX kernels (see the module docstring)."""
    return "AMX_INT8 = 1" in llama_cpp_module().llama_print_system_info().decode(errors="replace")


def open_llama(path, **kwargs):
    """llama_cpp.Llama(path, **kwargs), without the AMX weight buffers where they crash."""
    llama_cpp = llama_cpp_module()
    if not amx_buffers_crash():
        return llama_cpp.Llama(str(path), **kwargs)
    # Llama() builds its model parameters from this function and offers no argument for the field
    capi = llama_cpp.llama_cpp
    default = capi.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    capi.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(str(path), **kwargs)
    finally:
        capi.llama_model_default_params = default
