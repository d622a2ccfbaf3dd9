//! Kwai Summary Attention (KSA) for candle.
