//! `${ENV_VAR}` in config files, so secrets come from the environment (systemd credentials,
//! ECS secrets) and never sit in a file or a repository.
//!
//! `${NAME}` must be set (an unset variable is an error naming the file and line, not an empty
//! string that fails later in a confusing way); `${NAME:-default}` falls back; `$${` is a
//! literal `${`.

use std::path::Path;

use super::ConfigError;

/// Replace every `${NAME}` / `${NAME:-default}` in `text` using `lookup`.
pub fn interpolate(path: &Path, text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut consumed = 0usize;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            out.push_str("${");
            rest = escaped;
            consumed += i + 3;
            continue;
        }
        if !after.starts_with('{') {
            out.push('$');
            rest = after;
            consumed += i + 1;
            continue;
        }
        let Some(end) = after.find('}') else {
            return Err(ConfigError::at(path, text, consumed + i, "unterminated ${ in config"));
        };
        let expr = &after[1..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ConfigError::at(path, text, consumed + i, format!("invalid variable reference ${{{expr}}}")));
        }
        match lookup(name).or_else(|| default.map(str::to_string)) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(ConfigError::at(
                    path,
                    text,
                    consumed + i,
                    format!("environment variable {name} is not set (referenced as ${{{name}}})"),
                ));
            }
        }
        rest = &after[end + 1..];
        consumed += i + 1 + end + 1;
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: &str) -> Option<String> {
        match n {
            "PW" => Some("s3cr3t".into()),
            _ => None,
        }
    }

    #[test]
    fn replaces_defaults_and_escapes() {
        let p = Path::new("c.toml");
        assert_eq!(interpolate(p, "a=\"${PW}\"", env).unwrap(), "a=\"s3cr3t\"");
        assert_eq!(interpolate(p, "a=\"${X:-d}\"", env).unwrap(), "a=\"d\"");
        assert_eq!(interpolate(p, "a=\"$${PW} $x\"", env).unwrap(), "a=\"${PW} $x\"");
    }

    #[test]
    fn unset_variable_names_line() {
        let p = Path::new("c.toml");
        let e = interpolate(p, "a = 1\nb = \"${NOPE}\"", env).unwrap_err().to_string();
        assert_eq!(e, "c.toml:2:6: environment variable NOPE is not set (referenced as ${NOPE})");
    }
}
