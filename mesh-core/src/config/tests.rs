use super::*;

#[test]
fn the_commented_file_round_trips_with_values_set() {
    let mut f = NodeFile {
        model_dir: Some("/models/x".into()),
        blocks: Some("2..4".into()),
        span_len: Some(3),
        quantize: Some("q4k".into()),
        key: Some("k.key".into()),
        ..NodeFile::default()
    };
    f.network.bootstrap = vec!["/ip4/1.2.3.4/tcp/31337".into()];
    f.network.max_connections_per_ip = 64;
    f.limits.max_batch = 4;
    f.http.listen = "127.0.0.1:0".into();
    f.daemon.pid_file = Some("run/x.pid".into());
    f.daemon.log_keep = 2;
    f.settle.every = Some("1h".into());
    f.settle.minimum = 500;
    assert_eq!(NodeFile::parse(&f.commented_toml()).unwrap(), f);
    assert_eq!(NodeFile::parse("").unwrap(), NodeFile::default());
}

#[test]
fn a_typo_names_the_key_even_in_a_table() {
    let err = NodeFile::parse("[limits]\nmax_sesions = 3\n").unwrap_err();
    assert!(err.contains("max_sesions"), "{err}");
    assert!(
        err.contains("max_sessions"),
        "suggests the real keys: {err}"
    );
    let err = NodeFile::parse("dtype = 3").unwrap_err();
    assert!(err.contains("dtype"), "{err}");
}

#[test]
fn resolve_checks_values_and_makes_paths_absolute() {
    let base = Path::new("/etc/mesh");
    let r = NodeFile::default().resolve(base).unwrap();
    assert_eq!(r.key, base.join("node.key"));
    assert_eq!(r.pid_file, base.join("mesh-node.pid"));
    assert_eq!(r.http.to_string(), DEFAULT_HTTP);

    let bad = |f: NodeFile, key: &str| {
        let e = f.resolve(base).unwrap_err().to_string();
        assert!(e.starts_with(key), "{e}");
    };
    bad(
        NodeFile {
            blocks: Some("4..2".into()),
            ..NodeFile::default()
        },
        "blocks",
    );
    bad(
        NodeFile {
            dtype: "f8".into(),
            ..NodeFile::default()
        },
        "dtype",
    );
    bad(
        NodeFile {
            model: "llama".into(),
            ..NodeFile::default()
        },
        "model_dir",
    );
    bad(
        NodeFile {
            quantize: Some("q3".into()),
            ..NodeFile::default()
        },
        "quantize",
    );
    for max_batch in [0, 17] {
        let mut f = NodeFile::default();
        f.limits.max_batch = max_batch;
        bad(f, "limits.max_batch");
    }
    let mut f = NodeFile::default();
    f.limits.max_batch = 1;
    assert_eq!(f.resolve(base).unwrap().limits.max_batch, 1);
    let r = NodeFile {
        quantize: Some("q8_0".into()),
        model: "qwen".into(),
        model_dir: Some("Qwen/Qwen2.5-0.5B-Instruct".into()),
        ..NodeFile::default()
    }
    .resolve(base)
    .unwrap();
    assert_eq!(r.quantize, Some(crate::model::Quantization::Q8_0));
    // A hub id that names no local path stays a hub id.
    assert_eq!(r.model_dir, Some("Qwen/Qwen2.5-0.5B-Instruct".into()));
    let mut f = NodeFile::default();
    f.network.bootstrap = vec!["not an addr".into()];
    bad(f, "network.bootstrap[0]");
    let mut f = NodeFile::default();
    f.http.listen = "localhost".into();
    bad(f, "http.listen");
    let mut f = NodeFile::default();
    f.network.max_connections_per_ip = 0;
    bad(f, "network");
}

#[test]
fn write_new_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/node.toml");
    NodeFile::default().write_new(&path, false).unwrap();
    std::fs::write(&path, "model = \"mine\"\n").unwrap();
    let err = NodeFile::default().write_new(&path, false).unwrap_err();
    assert!(matches!(err, ConfigError::Exists(_)), "{err}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "model = \"mine\"\n"
    );
    NodeFile::default().write_new(&path, true).unwrap();
    assert_eq!(NodeFile::load(&path).unwrap(), NodeFile::default());
}
