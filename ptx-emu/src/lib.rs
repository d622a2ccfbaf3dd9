//! Placeholder: the PTX emulator is being written.
