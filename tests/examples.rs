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
fn every_metric_is_documented_in_the_operations_guide() {
    let guide = std::fs::read_to_string(crate::support::repo().join("docs/operations.md")).unwrap();
    for name in polysync::telemetry::metrics::names::ALL {
        let short = name.trim_start_matches("polysync_");
        assert!(guide.contains(&format!("`{short}`")), "docs/operations.md metrics table lacks {name}");
    }
}

/// Every ```toml block of the README and of docs/*.md, as (file:line, text).
fn doc_toml_blocks() -> Vec<(String, String)> {
    let repo = crate::support::repo();
    let mut files = vec![repo.join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(repo.join("docs")).unwrap().map(|e| e.unwrap().path()).collect();
    docs.sort();
    files.extend(docs.into_iter().filter(|p| p.extension().is_some_and(|e| e == "md")));
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut block: Option<(usize, String)> = None;
        for (i, line) in text.lines().enumerate() {
            match &mut block {
                None if line.trim_start().starts_with("```toml") => block = Some((i + 1, String::new())),
                Some((start, body)) if line.trim_start().starts_with("```") => {
                    out.push((
                        format!("{}:{}", f.strip_prefix(&repo).unwrap_or(&f).display(), start),
                        std::mem::take(body),
                    ));
                    block = None;
                }
                Some((_, body)) => {
                    body.push_str(line);
                    body.push('\n');
                }
                None => {}
            }
        }
    }
    out
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// The docs' examples are loaded the way `polysync check` loads a deployment: the config blocks
/// merged into one config, each pipeline block (or `[[sink]]` fragment, given a source and a
/// match) as a pipeline file, all checked together. An example that stops parsing, names a key
/// that does not exist or a sink the config lacks fails here.
#[test]
fn every_config_and_pipeline_example_in_the_docs_loads() {
    let dir = tempfile::tempdir().unwrap();
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir(&pipelines).unwrap();
    let mut config = toml::Table::new();
    let mut n_pipelines = 0;
    let blocks = doc_toml_blocks();
    assert!(blocks.len() >= 15, "found {} toml blocks", blocks.len());
    for (at, text) in &blocks {
        let mut t: toml::Table = text.parse().unwrap_or_else(|e| panic!("{at}: not TOML: {e}"));
        let is_pipeline = t.contains_key("source") || t.contains_key("sink") || t.contains_key("match");
        if !is_pipeline {
            merge(&mut config, t);
            continue;
        }
        t.entry("source").or_insert_with(|| "shop".into());
        if !t.contains_key("match") {
            t.insert("match".into(), "relations = [\"public.carts\"]".parse::<toml::Table>().unwrap().into());
        }
        if !t.contains_key("sink") {
            let sink: toml::Table = "target = \"cache\"\naction = \"set\"\nkey = \"x:{{ key.id }}\"".parse().unwrap();
            t.insert("sink".into(), toml::Value::Array(vec![sink.into()]));
        }
        t.remove("name"); // named after its file, so two examples never clash
        let file = pipelines.join(format!("example-{n_pipelines}.toml"));
        std::fs::write(&file, format!("# {at}\n{}", toml::to_string(&t).unwrap())).unwrap();
        n_pipelines += 1;
    }
    assert!(n_pipelines >= 8, "{n_pipelines} pipeline examples");
    config.insert("pipelines".into(), pipelines.display().to_string().into());
    config.insert("state_dir".into(), dir.path().join("state").display().to_string().into());
    let path = dir.path().join("polysync.toml");
    let text = toml::to_string(&config).unwrap();
    std::fs::write(&path, &text).unwrap();
    let cfg = Config::parse(&path, &text, |_| Some("example".into())).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let loaded = polysync::app::check(&cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.len(), n_pipelines);
}
