pub mod bench;
pub mod fidelity;
pub mod generate;
pub mod roofline;
