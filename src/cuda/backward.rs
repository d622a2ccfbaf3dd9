//! The backward kernels' launch (placeholder).
