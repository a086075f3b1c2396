//! Logits of a token sequence, one token per forward step (as decode runs), as raw
//! little-endian f32 `[T, V]`: for comparing against llama.cpp position by position.
//!   cargo run --release -p rooftop-engine --example dump_logits -- MODEL OUT.f32 ID...
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let model = rooftop_engine::Model::load(std::path::Path::new(&a[1])).unwrap();
    let ids: Vec<u32> = a[3..].iter().map(|s| s.parse().unwrap()).collect();
    let mut cache = model.new_cache(ids.len() + 1);
    let mut out = Vec::new();
    for &t in &ids {
        let l = model
            .forward(&[t], &mut cache, rooftop_engine::Logits::Last)
            .unwrap();
        out.extend(l.iter().flat_map(|v| v.to_le_bytes()));
    }
    std::fs::write(&a[2], out).unwrap();
}
