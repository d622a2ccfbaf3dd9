// Placeholder: the decode kernels land here.
