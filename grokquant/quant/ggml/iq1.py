"""GGML IQ1_S and IQ1_M (1-bit lattice codebooks): bit-exact, vectorized ports of ggml-quants.c."""
