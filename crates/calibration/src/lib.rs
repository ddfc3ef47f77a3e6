//! # lowbit-calibration
//!
//! Quantization algorithms that work on one linear layer at a time, given its weight and
//! statistics of its inputs: round-to-nearest, GPTQ, AWQ, SmoothQuant, HQQ, and the rotation
//! methods (QuaRot Hadamard, SpinQuant). The layer-by-layer pipeline that feeds them real
//! activations lives in `lowbit-model`.
#![warn(missing_docs)]
