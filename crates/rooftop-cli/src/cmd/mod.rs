pub mod bench;
pub mod eval;
pub mod fidelity;
pub mod generate;
pub mod quantize;
pub mod roofline;
