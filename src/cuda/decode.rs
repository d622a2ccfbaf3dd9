//! The split-KV decode kernels' launch (placeholder).
