pub mod fidelity;
pub mod quantize;
