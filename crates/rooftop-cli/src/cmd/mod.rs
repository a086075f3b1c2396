pub mod cuda_check;
pub mod fidelity;
pub mod generate;
