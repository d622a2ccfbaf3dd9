// Placeholder: the bwd kernels land here.
