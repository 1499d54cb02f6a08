//! The GPU check: one table that says whether mesh computes right, and how fast, on a
//! GPU. `scripts/gpu-check.sh` runs it through the `gpu-check` binary on a machine with
//! an NVIDIA GPU; `tests/gpu.rs` asserts the same sections where a GPU is present.
//!
//! Sections:
//! 1. each fused kernel against its CPU reference (f32 < 1e-4, f16/bf16 < 1e-2);
//! 2. the transformers fixtures' logits on the device against CPU f32 and transformers;
//! 3. a 3-node mesh on loopback computing on the device: greedy tokens equal the CPU's;
//! 4. batch-1 decode of random-weight TinyLlama-1.1B and Llama-3-8B shapes: ms/token,
//!    achieved bandwidth and the ratio to the floor (bytes per token over the device's
//!    measured copy bandwidth), with the fused kernels and with candle's generic ops.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use futures::StreamExt;
use mesh_core::model::kernels::agreement::{self, KernelShape};
use mesh_core::model::{
    tiny, ClientHead, DeviceSpec, LocalModel, ModelFiles, SamplingParams, SpanModel,
};
use mesh_core::BlockRange;

use crate::decode_timing::{copy_bandwidth, time_decode, ModelShape};

/// One line of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub section: &'static str,
    pub item: String,
    pub value: String,
    pub target: String,
    /// `None` for figures that have no pass/fail (timings).
    pub ok: Option<bool>,
}

impl Row {
    fn new(section: &'static str, item: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            section,
            item: item.into(),
            value: value.into(),
            target: String::new(),
            ok: None,
        }
    }

    fn checked(mut self, target: impl Into<String>, ok: bool) -> Self {
        self.target = target.into();
        self.ok = Some(ok);
        self
    }
}

/// The table as Markdown, ready for docs/performance.md.
pub fn render(rows: &[Row]) -> String {
    let mut out = String::from("| section | check | value | target | |\n|---|---|---|---|---|\n");
    for r in rows {
        let verdict = match r.ok {
            Some(true) => "ok",
            Some(false) => "FAIL",
            None => "",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.section, r.item, r.value, r.target, verdict
        );
    }
    out
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

/// Section 1: every kernel at three model shapes in f32, f16 and bf16.
pub fn kernels(device: &Device) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for shape in [
        KernelShape::TINY,
        KernelShape::TINYLLAMA,
        KernelShape::LLAMA3_8B,
    ] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for a in agreement::check(device, shape, dtype)? {
                rows.push(
                    Row::new(
                        "kernels",
                        format!("{} {} {}", a.kernel, a.shape, dtype_name(a.dtype)),
                        format!("{:.2e}", a.rel_err),
                    )
                    .checked(format!("< {:.0e}", a.limit), a.passed()),
                );
            }
        }
    }
    Ok(rows)
}

/// What `scripts/make_hf_fixture.py` saved from transformers.
struct Expected {
    input_ids: Vec<u32>,
    logits: Tensor,
    greedy_ids: Vec<u32>,
}

fn expected(dir: &Path) -> anyhow::Result<Expected> {
    let t = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
    let get = |name: &str| {
        t.get(name)
            .with_context(|| format!("{name} in {}", dir.display()))
    };
    let ids = |name: &str| -> anyhow::Result<Vec<u32>> {
        Ok(get(name)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|x| x as u32)
            .collect())
    };
    Ok(Expected {
        input_ids: ids("input_ids")?,
        logits: get("logits")?.clone(),
        greedy_ids: ids("greedy_ids")?,
    })
}

/// Logits at every prompt position, from one prefill through the whole model.
fn prompt_logits(
    files: &ModelFiles,
    ids: &[u32],
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Tensor> {
    let head = ClientHead::load(files, DType::F32, device)?;
    let span = SpanModel::load(
        files,
        BlockRange::new(0, files.config.num_blocks()),
        dtype,
        device,
    )?;
    let mut cache = span.new_cache(ids.len() + 1)?;
    let hidden = span.forward(&mut cache, &head.embed(ids)?, 0)?;
    Ok(head.logits(&hidden)?.squeeze(0)?)
}

/// Section 2: the committed transformers fixtures, run on `device`.
pub fn fixtures(device: &Device, fixtures_dir: &Path) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(fixtures_dir)
        .with_context(|| format!("fixtures in {}", fixtures_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected.safetensors").exists())
        .collect();
    names.sort();
    for dir in names {
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let files = ModelFiles::open(&dir)?;
        let want = expected(&dir)?;
        let cpu = prompt_logits(&files, &want.input_ids, DType::F32, &Device::Cpu)?;
        // bf16 on the GPU; on the CPU the check stays f32 (mesh-core's tests cover bf16 there).
        let dtypes: &[DType] = if device.is_cuda() {
            &[DType::F32, DType::BF16]
        } else {
            &[DType::F32]
        };
        for &dtype in dtypes {
            let got = prompt_logits(&files, &want.input_ids, dtype, device)?;
            let limit = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
            for (against, reference) in [("CPU f32", &cpu), ("transformers", &want.logits)] {
                let err = agreement::relative_error(&got, reference)?;
                rows.push(
                    Row::new(
                        "fixtures",
                        format!("{name} logits {} vs {against}", dtype_name(dtype)),
                        format!("{err:.2e}"),
                    )
                    .checked(format!("< {limit:.0e}"), err < limit),
                );
            }
        }
        // Greedy decoding with the cache, token by token: the fused decode path.
        let model = LocalModel::load_spans(
            &dir,
            &[BlockRange::new(0, files.config.num_blocks())],
            DType::F32,
            device,
        )?;
        let params = SamplingParams::greedy(want.greedy_ids.len());
        let got = model.generate_ids(want.input_ids.clone(), &params, |_| {})?;
        let same = got.generated() == want.greedy_ids.as_slice();
        rows.push(
            Row::new(
                "fixtures",
                format!("{name} greedy f32, {} tokens", want.greedy_ids.len()),
                if same {
                    "equal".to_string()
                } else {
                    format!("{:?}", got.generated())
                },
            )
            .checked("= transformers", same),
        );
    }
    Ok(rows)
}

/// Section 3: bootstrap and 3 nodes on loopback (real libp2p, in this process) serving the
/// tiny model from `spec`, and a client whose head is there too; greedy tokens against
/// the whole model run on the CPU.
pub async fn mesh(spec: DeviceSpec, work_dir: &Path) -> anyhow::Result<Vec<Row>> {
    let model_dir = tiny::ensure(&work_dir.join("tiny"))?;
    let selected = mesh_core::model::device::select(spec);
    let spans = BlockRange::even_split(tiny::config().num_blocks(), 3);
    let mesh = mesh_core::local_mesh::LocalMesh::start_on(
        &model_dir,
        &spans,
        DType::F32,
        &selected.device,
    )
    .await?;
    let client = mesh_client::MeshClient::builder()
        .bootstrap([mesh.bootstrap_addr().clone()])
        .model_dir(&model_dir)
        .device(spec)
        .build()
        .await?;
    let prompt = "The mesh runs models on everyone's GPUs.";
    let tokens = 32;
    let started = Instant::now();
    let mut stream = client
        .generate(prompt, SamplingParams::greedy(tokens))
        .await?;
    let mut got = Vec::new();
    while let Some(token) = stream.next().await {
        got.push(token?.id);
    }
    let per_token = started.elapsed().as_secs_f64() * 1e3 / got.len().max(1) as f64;
    let cpu = LocalModel::load_split(&model_dir, 1, &Device::Cpu)?;
    let want = cpu.generate_ids(
        client.prompt_ids(prompt)?,
        &SamplingParams::greedy(tokens),
        |_| {},
    )?;
    mesh.stop().await?;
    let same = got == want.generated();
    Ok(vec![
        Row::new(
            "mesh",
            format!(
                "3 nodes on {}, greedy {} tokens",
                selected.description,
                got.len()
            ),
            if same {
                "equal".to_string()
            } else {
                format!("{got:?}")
            },
        )
        .checked("= CPU", same),
        Row::new(
            "mesh",
            "3-node loopback, ms/token (incl. prefill)",
            format!("{per_token:.2}"),
        ),
    ])
}

/// Section 4: decode timings of both shapes, fused and generic, against the floor.
pub fn decode(device: &Device, dtype: DType, tokens: usize) -> anyhow::Result<Vec<Row>> {
    let bandwidth = copy_bandwidth(device)?;
    let mut rows = vec![Row::new(
        "decode",
        "device copy bandwidth (read + write)",
        format!("{:.0} GB/s", bandwidth / 1e9),
    )];
    for shape in [ModelShape::TINYLLAMA_1_1B, ModelShape::LLAMA3_8B] {
        let mut fused_ms = None;
        for fused in [true, false] {
            let t = time_decode(shape, device, dtype, 128, tokens, fused, None)?;
            let floor_ms = t.bytes_per_token / bandwidth * 1e3;
            let ratio = t.ms_per_token / floor_ms;
            let path = if fused {
                "fused kernels"
            } else {
                "candle generic ops"
            };
            let mut row = Row::new(
                "decode",
                format!("{} {} batch 1, {path}", shape.name, dtype_name(dtype)),
                format!(
                    "{:.3} ms/token, {:.0} tok/s, {:.0} GB/s, {:.2}x floor ({:.3} ms)",
                    t.ms_per_token,
                    1e3 / t.ms_per_token,
                    t.gb_per_s(),
                    ratio,
                    floor_ms
                ),
            );
            if fused && shape.name == ModelShape::TINYLLAMA_1_1B.name {
                row = row.checked("within 2x of floor", ratio <= 2.0);
            }
            rows.push(row);
            match fused_ms {
                None => fused_ms = Some(t.ms_per_token),
                Some(f) => rows.push(Row::new(
                    "decode",
                    format!("{} generic / fused", shape.name),
                    format!("{:.2}x", t.ms_per_token / f),
                )),
            }
        }
    }
    Ok(rows)
}
