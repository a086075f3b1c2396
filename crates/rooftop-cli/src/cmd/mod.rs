pub mod bench;
pub mod fidelity;
pub mod roofline;
pub mod generate;
