//! Save, load and recovery.
