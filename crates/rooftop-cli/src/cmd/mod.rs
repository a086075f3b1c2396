pub mod fidelity;
pub mod quantize;
pub mod generate;
