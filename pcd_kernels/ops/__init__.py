"""One module per operation: argument checks, backend dispatch, the autograd/custom op."""
