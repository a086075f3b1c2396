pub mod fidelity;
