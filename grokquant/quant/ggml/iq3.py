"""GGML IQ3_XXS and IQ3_S (3-bit lattice codebooks): bit-exact, vectorized ports of ggml-quants.c."""
