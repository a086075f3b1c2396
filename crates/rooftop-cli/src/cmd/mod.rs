pub mod fidelity;
pub mod generate;
