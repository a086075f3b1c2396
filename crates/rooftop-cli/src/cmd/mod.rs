pub mod bench;
pub mod cuda_check;
pub mod eval;
pub mod fidelity;
pub mod generate;
pub mod quantize;
pub mod roofline;
