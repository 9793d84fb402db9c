//! Every shipped config and pipeline example loads and compiles, so the docs cannot rot.

use polysync::app::Config;

/// Load a shipped config with every `${VAR}` set to a placeholder; its pipelines directory is
/// the repository's `pipelines/` when the configured one only exists in a deployment.
fn load_example(path: &std::path::Path) -> Config {
    let text = std::fs::read_to_string(path).unwrap();
    let mut cfg = Config::parse(path, &text, |_| Some("example".into())).unwrap_or_else(|e| panic!("{e}"));
    if !cfg.pipelines_dir.exists() {
        cfg.pipelines_dir = crate::support::repo().join("pipelines");
    }
    cfg
}

#[test]
fn shipped_configs_and_pipelines_load() {
    let dir = crate::support::repo().join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = load_example(&path);
            let pipelines = polysync::app::check(&cfg).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!pipelines.is_empty(), "{} loads no pipeline", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 2);
    // Every pipeline file is used by some config (config/local.toml points at pipelines/).
    let local = load_example(&dir.join("local.toml"));
    let loaded = polysync::app::check(&local).unwrap().len();
    let files = std::fs::read_dir(crate::support::repo().join("pipelines")).unwrap().count();
    assert_eq!(loaded, files, "every file in pipelines/ is a loadable pipeline");
}

#[test]
fn every_metric_is_documented_in_the_readme() {
    let readme = std::fs::read_to_string(crate::support::repo().join("README.md")).unwrap();
    for name in polysync::telemetry::metrics::names::ALL {
        let short = name.trim_start_matches("polysync_");
        assert!(readme.contains(&format!("`{short}`")), "README metrics table lacks {name}");
    }
}
