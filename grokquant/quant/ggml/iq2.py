"""GGML IQ2_XXS, IQ2_XS and IQ2_S (2-bit lattice codebooks): bit-exact, vectorized ports of ggml-quants.c."""
