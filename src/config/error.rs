//! Config errors always say where: `file:line:col: message`, or the object they are about,
//! because the person reading them is editing a file, often under pressure.

use std::path::{Path, PathBuf};

/// Everything that can be wrong with `polysync.toml` or a pipeline file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something at a known place in a file.
    #[error("{}:{line}:{col}: {msg}", path.display())]
    At {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column (in characters).
        col: usize,
        /// What is wrong.
        msg: String,
    },
    /// Something about a named object whose place in a file is not known.
    #[error("{what}: {msg}")]
    Invalid {
        /// The object (`source "shop"`, `sink "cache"`).
        what: String,
        /// What is wrong.
        msg: String,
    },
    /// Several independent problems, reported together so one run of `check` shows them all.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Many(Vec<ConfigError>),
}

impl ConfigError {
    /// An error at byte `offset` of `text`, converted to line and column.
    pub fn at(path: &Path, text: &str, offset: usize, msg: impl Into<String>) -> ConfigError {
        let (line, col) = line_col(text, offset);
        ConfigError::At { path: path.to_owned(), line, col, msg: msg.into() }
    }

    /// Turn a TOML parse/deserialize error into a located one. An unknown key is pointed at
    /// itself: serde reports it with the span of its whole table when the table is read
    /// through a tagged enum (`kind = "postgres"`), which would name the table's header line.
    pub fn from_toml(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
        let msg = e.message().trim();
        let mut offset = e.span().map(|s| s.start).unwrap_or(0);
        if let (Some(span), Some(key)) = (e.span(), unknown_key(msg))
            && let Some(at) = key_offset(text, table_body(text, span), key)
        {
            offset = at;
        }
        ConfigError::at(path, text, offset, explain(msg))
    }

    /// Collapse a list: none → Ok, one → itself, more → `Many`.
    pub fn collect(mut errors: Vec<ConfigError>) -> Result<(), ConfigError> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }
}

/// The key of serde's "unknown field `x`, expected one of …".
fn unknown_key(msg: &str) -> Option<&str> {
    let rest = msg.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(k, _)| k)
}

/// A table's text from its header to the next table header: the span serde reports for a
/// table may cover only its header line.
pub fn table_body(text: &str, span: std::ops::Range<usize>) -> std::ops::Range<usize> {
    let from = span.start.min(text.len());
    let end = text[from..]
        .match_indices("\n[")
        .map(|(i, _)| from + i)
        .find(|&i| i > from)
        .unwrap_or(text.len())
        .max(span.end.min(text.len()));
    from..end
}

/// Where `key = …` starts inside `span` (bare or quoted key at the start of a line).
pub fn key_offset(text: &str, span: std::ops::Range<usize>, key: &str) -> Option<usize> {
    let end = span.end.min(text.len());
    let start = span.start.min(end);
    let mut pos = start;
    for line in text[start..end].split_inclusive('\n') {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let bare = trimmed.strip_prefix(key);
        let quoted = trimmed.strip_prefix(&format!("\"{key}\"")).or(trimmed.strip_prefix(&format!("'{key}'")));
        if let Some(after) = bare.or(quoted)
            && after.trim_start().starts_with(['=', '.'])
        {
            return Some(pos + indent);
        }
        pos += line.len();
    }
    None
}

/// Where `word` first appears in `text` as a whole word outside comment lines: a column named
/// in a pipeline (`"usr_id"` in a list, `row.usr_id` in a template), so an error found only
/// against the database can still point at the line that named it.
pub fn word_offset(text: &str, word: &str) -> Option<usize> {
    if word.is_empty() {
        return None;
    }
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word).map(|(i, _)| i).find(|&i| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        let line_start = text[..i].rfind('\n').map(|n| n + 1).unwrap_or(0);
        !before.is_some_and(ident) && !after.is_some_and(ident) && !text[line_start..i].trim_start().starts_with('#')
    })
}

/// serde's wording, rewritten where it does not say what was expected.
fn explain(msg: &str) -> String {
    if msg.contains("did not match any variant of untagged enum") {
        return format!(
            "{msg}: see the examples in docs/ (configuration.md, sources.md, sinks.md, pipelines.md) for this setting's accepted forms (a string, or a table of the documented keys)"
        );
    }
    msg.to_string()
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_is_found_as_a_whole_word_outside_comments() {
        let text = "# user_id is old\nname = \"p\"\nkey = \"u:{{ row.user_idx }}\"\ncolumns = [\"id\", \"user_id\"]\n";
        let at = word_offset(text, "user_id").unwrap();
        assert_eq!(line_col(text, at), (4, 19));
        assert_eq!(word_offset(text, "missing"), None);
    }

    #[test]
    fn an_unknown_key_is_pointed_at_itself() {
        let text = "[sources.app]\nkind = \"postgres\"\nslot = \"s\"\ncreate_if_mising = true\n";
        let span = 0..text.len();
        assert_eq!(unknown_key("unknown field `create_if_mising`, expected one of `a`, `b`"), Some("create_if_mising"));
        let at = key_offset(text, span, "create_if_mising").unwrap();
        assert_eq!(line_col(text, at), (4, 1));
    }

    #[test]
    fn line_col_counts_from_one() {
        let t = "a = 1\nbb = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, 9), (2, 4));
    }
}
