//! Every shipped config and pipeline example loads and compiles, so the docs cannot rot.

use polysync::config::Config;

#[test]
fn shipped_configs_and_pipelines_load() {
    let dir = crate::support::repo().join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            let pipelines = polysync::app::check(&cfg).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!pipelines.is_empty(), "{} loads no pipeline", path.display());
            seen += 1;
        }
    }
    assert!(seen > 0);
    // Every pipeline file is used by some config (config/local.toml points at pipelines/).
    let local = Config::load(&dir.join("local.toml")).unwrap();
    let loaded = polysync::app::check(&local).unwrap().len();
    let files = std::fs::read_dir(crate::support::repo().join("pipelines")).unwrap().count();
    assert_eq!(loaded, files, "every file in pipelines/ is a loadable pipeline");
}
