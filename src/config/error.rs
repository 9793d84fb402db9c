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

    /// Turn a TOML parse/deserialize error into a located one.
    pub fn from_toml(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        ConfigError::at(path, text, offset, e.message().trim().to_string())
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
    fn line_col_counts_from_one() {
        let t = "a = 1\nbb = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, 9), (2, 4));
    }
}
