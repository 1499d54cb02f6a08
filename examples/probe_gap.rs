use candle_core::{DType, Device, Tensor};
use mesh_core::model::matvec::{forward_many, Dense};
use std::time::Instant;

fn d(r: usize, c: usize, seed: usize) -> Dense {
    let v: Vec<f32> = (0..r * c)
        .map(|i| (((i + seed) % 97) as f32) * 0.001)
        .collect();
    Dense::new(Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap(), None)
}

fn main() {
    let x512 = Tensor::ones((1, 512), DType::F32, &Device::Cpu).unwrap();
    let x1376 = Tensor::ones((1, 1376), DType::F32, &Device::Cpu).unwrap();
    let layers: Vec<[Dense; 7]> = (0..8)
        .map(|l| {
            [
                d(512, 512, l),
                d(512, 512, l + 1),
                d(512, 512, l + 2),
                d(512, 512, l + 3),
                d(1376, 512, l),
                d(1376, 512, l + 5),
                d(512, 1376, l),
            ]
        })
        .collect();
    let head = d(32000, 512, 7);
    let big = d(81408, 512, 3);
    let raw: Vec<f32> = (0..81408 * 512).map(|i| (i % 13) as f32).collect();
    let bytes = (81408 * 512 * 4) as f64;
    let pool = mesh_core::model::matvec::pool();
    let n = 5;
    let started = Instant::now();
    while started.elapsed().as_secs() < 170 {
        let t = Instant::now();
        for _ in 0..n {
            std::thread::scope(|s| {
                let hs: Vec<_> = raw
                    .chunks(raw.len() / 2)
                    .map(|c| s.spawn(move || mesh::decode_timing::read_all(c)))
                    .collect();
                for h in hs {
                    std::hint::black_box(h.join().unwrap());
                }
            });
        }
        let r = bytes / (t.elapsed().as_secs_f64() / n as f64) / 1e9;
        let t = Instant::now();
        for _ in 0..n {
            let _h = pool.hold();
            for l in &layers {
                std::hint::black_box(forward_many(&[&l[0], &l[1], &l[2]], &x512).unwrap());
                std::hint::black_box(l[3].forward(&x512).unwrap());
                std::hint::black_box(forward_many(&[&l[4], &l[5]], &x512).unwrap());
                std::hint::black_box(l[6].forward(&x1376).unwrap());
            }
            std::hint::black_box(head.forward(&x512).unwrap());
        }
        let a = bytes / (t.elapsed().as_secs_f64() / n as f64) / 1e9;
        let t = Instant::now();
        for _ in 0..n {
            let _h = pool.hold();
            std::hint::black_box(big.forward(&x512).unwrap());
        }
        let b = bytes / (t.elapsed().as_secs_f64() / n as f64) / 1e9;
        println!(
            "{:6.1}s read {r:5.1} sequence {a:5.1} one-product {b:5.1} GB/s",
            started.elapsed().as_secs_f64()
        );
    }
}
