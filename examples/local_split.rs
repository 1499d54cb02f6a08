//! Load the embedded tiny model as 3 spans in this process and generate.
//!
//! `cargo run --release --example local_split`

use mesh_core::model::{builtin, LocalModel, SamplingParams};

fn main() -> anyhow::Result<()> {
    let dir = builtin::DEFAULT.ensure()?;
    let model = LocalModel::load_split(&dir, 3, &candle_core::Device::Cpu)?;
    let out = model.generate("Hello, mesh", &SamplingParams::greedy(24), |text| {
        print!("{text}")
    })?;
    println!("\n{} tokens, {:?}", out.tokens.len(), out.finish);
    Ok(())
}
