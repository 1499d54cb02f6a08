//! Speculative decoding over a real mesh of the demo model: with a draft model,
//! `mesh-client generate` writes exactly what it writes without one when greedy, and
//! sampled tokens follow the target's distribution, in fewer steps through the mesh.

use std::collections::HashMap;
use std::process::Command;

use candle_core::Device;
use futures::StreamExt;
use mesh_client::{MeshClient, SamplingParams};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::builtin::Builtin;
use mesh_core::model::{LocalModel, ModelFiles, Sampler};
use mesh_core::BlockRange;

const CLI: &str = env!("CARGO_BIN_EXE_mesh-client");
const PROMPT: &str = "It is a truth universally acknowledged";

/// What `mesh-client generate` printed: the text, and the speculation line if any.
struct Run {
    text: String,
    speculation: Option<String>,
}

async fn generate(mesh: &LocalMesh, home: &std::path::Path, extra: &[&str]) -> Run {
    let mut cmd = Command::new(CLI);
    cmd.args(["generate", "--max-tokens", "40", "--prompt", PROMPT])
        .arg("--bootstrap")
        .arg(mesh.bootstrap_addr().to_string())
        .args(extra)
        .env("MESH_HOME", home)
        .env("RUST_LOG", "error");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout
        .split_once("\n\nroute:")
        .map(|(t, _)| t.to_owned())
        .unwrap_or_else(|| panic!("no route print in:\n{stdout}"));
    let speculation = stdout
        .lines()
        .find(|l| l.starts_with("speculation:"))
        .map(str::to_owned);
    Run { text, speculation }
}

/// `steps`, `tokens` and `accepted` of a speculation line.
fn numbers(line: &str) -> (usize, usize, usize) {
    let words: Vec<&str> = line.split(' ').collect();
    let after = |w: &str| -> usize {
        let at = words.iter().position(|x| *x == w).unwrap();
        words[at - 1].parse().unwrap()
    };
    (after("steps"), after("tokens"), after("of"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_changes_the_round_trips_not_the_greedy_text_and_seeded_runs_repeat() {
    let home = tempfile::tempdir().unwrap();
    let models = home.path().join("models");
    let dir = Builtin::Demo.ensure_under(&models).unwrap();
    let blocks = ModelFiles::open(&dir).unwrap().config.num_blocks();
    let mesh = LocalMesh::start(&dir, &BlockRange::even_split(blocks, 3))
        .await
        .unwrap();
    for sampling in [&["--temperature", "0"][..], &["--seed", "7"][..]] {
        let greedy = sampling[0] == "--temperature";
        let plain = generate(&mesh, home.path(), sampling).await;
        assert!(plain.speculation.is_none());
        for draft in ["mesh-demo-draft", "mesh-demo"] {
            let args = [sampling, &["--draft-model", draft]].concat();
            let fast = generate(&mesh, home.path(), &args).await;
            let line = fast.speculation.clone().expect("a speculation line");
            println!("{sampling:?} draft {draft}: {line}");
            if greedy {
                assert_eq!(
                    fast.text, plain.text,
                    "draft {draft} changed the greedy text"
                );
            } else {
                // Sampled, the text is drawn from the same distribution
                // (`sampled_tokens_with_a_draft_follow_the_targets_distribution`), and
                // the same seed gives the same text.
                let again = generate(&mesh, home.path(), &args).await;
                assert_eq!(again.text, fast.text, "draft {draft}: a seeded run changed");
            }
            let (steps, tokens, accepted) = numbers(&line);
            assert!(steps < tokens, "no step made two tokens: {line}");
            assert!(accepted > 0, "{line}");
            if draft == "mesh-demo" {
                // The target as its own draft: it agrees with nearly everything.
                assert!(steps * 3 <= tokens, "{line}");
            }
        }
    }
    mesh.stop().await.unwrap();
}

/// The target's next-token distribution after `ids` under `params`, run locally.
fn next_token(model: &LocalModel, ids: &[u32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let span = &model.spans()[0];
    let mut cache = span.new_cache(ids.len()).unwrap();
    let hidden = model.head().embed(ids).unwrap();
    let hidden = span.forward(&mut cache, &hidden, 0).unwrap();
    let logits = model.head().last_logits(&hidden).unwrap();
    Sampler::new(params.clone())
        .distribution(&logits, ids)
        .probabilities()
        .map(|(t, p)| (t, f64::from(p)))
        .collect()
}

/// The speculative-sampling rule keeps the target's distribution: over many seeds, the
/// second generated token (the first one a draft proposes for; the first comes from the
/// prefill) follows the exact distribution computed locally by summing over the first,
/// with a draft as without one. A rule that kept whatever the draft proposed, or that
/// compared against the draft's argmax, fails it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_tokens_with_a_draft_follow_the_targets_distribution() {
    const SEEDS: u64 = 300;
    let home = tempfile::tempdir().unwrap();
    let models = home.path().join("models");
    let dir = Builtin::Demo.ensure_under(&models).unwrap();
    let draft = Builtin::DemoDraft.ensure_under(&models).unwrap();
    let model = LocalModel::load_split(&dir, 1, &Device::Cpu).unwrap();
    let eos = model.files().config.eos_tokens();
    let prompt = model.tokenizer().unwrap().encode("The night was").unwrap();
    let params = SamplingParams {
        // Room for a proposal after the first token (the last one is the target's own).
        max_new_tokens: 3,
        temperature: 1.0,
        top_k: Some(5),
        top_p: None,
        repetition_penalty: 1.0,
        seed: 0,
        stop_tokens: Vec::new(),
    };
    // P(second token) = sum over first tokens of P(first) P(second | first); `None` is
    // "no second token" (an EOS came first or second).
    let mut expected: HashMap<Option<u32>, f64> = HashMap::new();
    for (first, p_first) in next_token(&model, &prompt, &params) {
        if eos.contains(&first) {
            *expected.entry(None).or_default() += p_first;
            continue;
        }
        let ids = [&prompt[..], &[first]].concat();
        for (second, p) in next_token(&model, &ids, &params) {
            let key = (!eos.contains(&second)).then_some(second);
            *expected.entry(key).or_default() += p_first * p;
        }
    }
    let blocks = model.files().config.num_blocks();
    let mesh = LocalMesh::start(&dir, &[BlockRange::new(0, blocks)])
        .await
        .unwrap();
    for drafted in [false, true] {
        let mut builder = MeshClient::builder()
            .bootstrap([mesh.bootstrap_addr().clone()])
            .model_dir(&dir);
        if drafted {
            builder = builder.draft_model_dir(&draft).draft_tokens(3);
        }
        let client = builder.build().await.unwrap();
        let mut counts: HashMap<Option<u32>, usize> = HashMap::new();
        let mut proposed = 0;
        for seed in 0..SEEDS {
            let params = SamplingParams {
                seed,
                ..params.clone()
            };
            let mut stream = client.generate_ids(prompt.clone(), params).await.unwrap();
            let mut ids = Vec::new();
            while let Some(token) = stream.next().await {
                ids.push(token.unwrap().id);
            }
            if let Some(s) = stream.report().and_then(|r| r.speculation) {
                proposed += s.proposed;
            }
            *counts.entry(ids.get(1).copied()).or_default() += 1;
        }
        assert_eq!(proposed > 0, drafted, "proposals made: {proposed}");
        let (chi2, df) = pooled_chi_square(&expected, &counts, SEEDS as f64);
        let bound = chi_square_bound(df);
        println!("draft {drafted}: chi2 {chi2:.1} over {df} degrees of freedom, bound {bound:.1}");
        assert!(
            chi2 < bound,
            "draft {drafted}: chi2 {chi2:.1} >= {bound:.1} ({df} df); counts {counts:?}"
        );
    }
    mesh.stop().await.unwrap();
}

/// Pearson's chi-square of `counts` against `expected` probabilities over `n` draws, the
/// categories expected fewer than 5 times pooled into one; with its degrees of freedom.
fn pooled_chi_square(
    expected: &HashMap<Option<u32>, f64>,
    counts: &HashMap<Option<u32>, usize>,
    n: f64,
) -> (f64, usize) {
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let (mut rest_expected, mut rest_seen) = (0.0, 0.0);
    for (key, p) in expected {
        let seen = counts.get(key).copied().unwrap_or(0) as f64;
        if p * n >= 5.0 {
            cells.push((p * n, seen));
        } else {
            rest_expected += p * n;
            rest_seen += seen;
        }
    }
    // Anything seen that the target cannot produce lands in the pooled cell.
    rest_seen += counts
        .iter()
        .filter(|(key, _)| !expected.contains_key(key))
        .map(|(_, &c)| c as f64)
        .sum::<f64>();
    cells.push((rest_expected.max(1e-9), rest_seen));
    let chi2 = cells.iter().map(|(e, o)| (o - e).powi(2) / e).sum();
    (chi2, cells.len() - 1)
}

/// The chi-square value exceeded with probability 0.001 at `df` degrees of freedom
/// (Wilson-Hilferty: within 1% of the table for df >= 3).
fn chi_square_bound(df: usize) -> f64 {
    let k = df.max(1) as f64;
    let z = 3.09;
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}
