//! What `mesh-node start` checks before it binds a port or joins anything, over the real
//! binary: an isolated node nobody asked for, model files that lie about their size or are
//! cut short, limits that cannot work, and paths that are not what they should be, each
//! with a message that says what is wrong (and never the wrong thing).
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test --workspace`.

mod common;
mod ops_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ops_support::*;

/// Far longer than any of these checks takes; a node still running then has not checked.
const CHECK_LIMIT: Duration = Duration::from_secs(40);

/// What a bounded `mesh-node ARGS` run left: exit code (None: killed at the limit),
/// stdout, stderr.
struct Run {
    code: Option<i32>,
    out: String,
    err: String,
}

impl Run {
    /// Asserts it failed by itself, with each of `needles` on stderr and without `not`.
    fn fails_with(&self, needles: &[&str], not: &[&str]) {
        let Run { code, out, err } = self;
        assert!(
            code.is_some_and(|c| c != 0),
            "expected a failure, got {code:?} (None: still running after {CHECK_LIMIT:?})\n\
             stdout: {out}\nstderr (first 2000 bytes): {}",
            &err[..err.len().min(2000)]
        );
        for n in needles {
            assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
        }
        for n in not {
            assert!(!err.contains(n), "stderr says {n:?}:\n{err}");
        }
        assert!(
            err.len() < 4000,
            "a clear message, not a dump: {} bytes",
            err.len()
        );
    }
}

/// Runs `mesh-node ARGS` with `MESH_HOME=home`, output to files, killed after
/// [`CHECK_LIMIT`].
fn run(home: &Path, args: &[&str]) -> Run {
    // Output beside, not in, `home`: some cases make `home` impossible to create.
    let logs = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (logs.path().join("out"), logs.path().join("err"));
    let mut child = Command::new(binary("mesh-node"))
        .args(args)
        .env("MESH_HOME", home)
        .env("RUST_LOG", "info,libp2p=warn")
        .env("RUST_BACKTRACE", "0")
        .env_remove("MESH_NODE_CONFIG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn mesh-node");
    let deadline = Instant::now() + CHECK_LIMIT;
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        code,
        out: std::fs::read_to_string(&out_path).unwrap_or_default(),
        err: String::from_utf8_lossy(&std::fs::read(&err_path).unwrap_or_default()).into_owned(),
    }
}

/// A bootstrap address nothing answers on: a node given it is not isolated by choice,
/// and gets past the bootstrap check to the one under test.
const DEAD_BOOTSTRAP: &str =
    "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQV7xzECmqDr83dbePh2LfgQsAMGKV3fRGbJrtyMCDayY";

/// `start` on ephemeral loopback ports (no config file), then `extra`.
fn start_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "start",
        "--http",
        "127.0.0.1:0",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ];
    args.extend_from_slice(extra);
    args
}

/// A copy of the built-in tiny model in `dir`.
fn tiny_model(dir: &Path) -> PathBuf {
    mesh_core::model::tiny::ensure(dir).expect("tiny model")
}

#[test]
fn start_without_a_bootstrap_refuses_unless_standalone() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let r = run(&home, &start_args(&[]));
    r.fails_with(
        &["no bootstrap", "mesh-node init --bootstrap", "--standalone"],
        &[],
    );
    assert!(
        !r.out.contains("http on"),
        "refused before binding: {}",
        r.out
    );

    // Asked for, it serves alone.
    let mut args: Vec<String> = start_args(&["--standalone"])
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push("--pid-file".into());
    args.push(home.join("alone.pid").display().to_string());
    let mut node = Proc::spawn("standalone", "mesh-node", &args, &home);
    let deadline = Instant::now() + START_LIMIT;
    while !node.has_line(|l| l.starts_with("serving ")) {
        assert!(node.exited().is_none(), "exited: {}", node.stderr());
        assert!(Instant::now() < deadline, "not serving: {:?}", node.lines());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(node.terminate(), "clean stop");
}

#[test]
fn bad_model_files_are_caught_before_any_port_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");

    // config.json claims 100,000 blocks; the weights hold 8.
    let big = tiny_model(&dir.path().join("big"));
    let config = big.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let lie = text.replace("\"num_hidden_layers\": 8", "\"num_hidden_layers\": 100000");
    assert_ne!(lie, text);
    std::fs::write(&config, lie).unwrap();
    let big_dir = big.display().to_string();
    let r = run(
        &home,
        &start_args(&["--model-dir", &big_dir, "--bootstrap", DEAD_BOOTSTRAP]),
    );
    r.fails_with(&["100000", "num_hidden_layers", "8 blocks"], &[]);
    assert!(
        !r.out.contains("http on"),
        "checked before binding: {}",
        r.out
    );

    // The weights file cut in half.
    let cut = tiny_model(&dir.path().join("cut"));
    let weights = cut.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let cut_dir = cut.display().to_string();
    let r = run(
        &home,
        &start_args(&["--model-dir", &cut_dir, "--bootstrap", DEAD_BOOTSTRAP]),
    );
    r.fails_with(&[&weights.display().to_string()], &[]);
    assert!(
        !r.out.contains("http on"),
        "checked before binding: {}",
        r.out
    );
}

#[test]
fn limits_and_paths_get_the_right_message() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let dead = ["--bootstrap", DEAD_BOOTSTRAP];

    // No room for any KV cache: refused, as a flag and in the file.
    let r = run(
        &home,
        &start_args(&[&dead[..], &["--cache-budget-mib", "0"]].concat()),
    );
    r.fails_with(
        &["cache_budget_mib", "--cache-budget-mib", "at least 1"],
        &[],
    );
    let file_home = dir.path().join("file");
    write_config(
        &file_home,
        &config_text("", Some(DEAD_BOOTSTRAP))
            .replace("cache_budget_mib = 64", "cache_budget_mib = 0"),
    );
    run(&file_home, &["start"]).fails_with(&["cache_budget_mib", "at least 1"], &[]);

    // A key path that is a directory: said so, not "chmod 600".
    let key_dir = dir.path().join("keys");
    std::fs::create_dir_all(&key_dir).unwrap();
    let key = key_dir.display().to_string();
    let r = run(&home, &start_args(&[&dead[..], &["--key", &key]].concat()));
    r.fails_with(&[&key, "is a directory"], &["chmod"]);

    // Writing the built-in model fails (its home lies under a plain file): "cannot write",
    // not "cannot read".
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"not a directory").unwrap();
    let config = write_config(
        &dir.path().join("cfg"),
        &config_text("", Some(DEAD_BOOTSTRAP)),
    );
    let r = run(
        &plain.join("home"),
        &["start", "--config", &config.display().to_string()],
    );
    r.fails_with(
        &["cannot write", &plain.display().to_string()],
        &["cannot read"],
    );

    // The ledger cannot be opened: the error names its path.
    let ledger = plain.join("ledger");
    let ledger_arg = ledger.display().to_string();
    let r = run(
        &home,
        &start_args(&[&dead[..], &["--ledger-dir", &ledger_arg]].concat()),
    );
    r.fails_with(&[&ledger_arg], &[]);
}
