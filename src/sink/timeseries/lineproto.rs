//! InfluxDB line protocol, escaped exactly per its rules:
//!
//! * measurement: `,` and space are escaped with `\`;
//! * tag keys, tag values and field keys: `,`, `=` and space are escaped;
//! * string field values: `"` and `\` are escaped, inside double quotes;
//! * integers carry an `i` suffix, floats are written as decimal text, booleans as
//!   `true`/`false`, the timestamp is an integer in the request's precision.
//!
//! What the protocol cannot carry is refused with a reason (so the point is dead-lettered, not
//! written wrong): a newline in a name or tag, a tag value ending in `\`, an empty measurement
//! or field key, a non-finite float. Empty tag values are left out (InfluxDB has no empty
//! tags). Tags are written sorted by key, as InfluxDB recommends.

use std::fmt::Write as _;

/// A field value.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// Written as `<digits>` (a float); the text keeps a decimal's exact digits.
    Float(String),
    /// Written as `<n>i`.
    Integer(i64),
    /// Written as `"…"`.
    Str(String),
    /// Written as `true` / `false`.
    Bool(bool),
}

fn escape_into(out: &mut String, s: &str, specials: &[char]) {
    for c in s.chars() {
        if specials.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Names and tags are tokens: InfluxDB's scanner skips the byte after any backslash but only
/// unescapes `\,`, `\=` and `\ `, and treats tabs as separators. So a backslash right before
/// a character that must be escaped (or at the very end), a tab or a newline cannot be written
/// so that it reads back the same; such a point is refused.
fn check_name(what: &str, s: &str, specials: &[char]) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if s.contains(['\n', '\r', '\t']) {
        return Err(format!("{what} {s:?} contains a newline or tab, which line protocol cannot carry"));
    }
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && chars.peek().is_none_or(|n| specials.contains(n)) {
            return Err(format!(
                "{what} {s:?} has a backslash before {}, which line protocol cannot carry",
                match chars.peek() {
                    Some(n) => format!("{n:?}"),
                    None => "its end".to_string(),
                }
            ));
        }
    }
    Ok(())
}

/// True if `s` is a float literal line protocol accepts (and so can be written as is).
fn is_float_literal(s: &str) -> bool {
    !s.is_empty()
        && s.parse::<f64>().is_ok_and(f64::is_finite)
        && s.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
}

/// Append one line (without the trailing newline).
pub fn encode_line(
    out: &mut String,
    measurement: &str,
    tags: &[(String, String)],
    fields: &[(String, FieldValue)],
    timestamp: i64,
) -> Result<(), String> {
    // InfluxDB unescapes `\=` in measurements too, so a backslash before `=` cannot be carried.
    check_name("measurement", measurement, &[',', ' ', '='])?;
    if fields.is_empty() {
        return Err("a point needs at least one field".into());
    }
    let start = out.len();
    let result = (|| {
        escape_into(out, measurement, &[',', ' ']);
        let mut sorted: Vec<&(String, String)> = tags.iter().filter(|(_, v)| !v.is_empty()).collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (k, v) in sorted {
            check_name("tag key", k, &[',', '=', ' '])?;
            check_name(&format!("tag {k}"), v, &[',', '=', ' '])?;
            out.push(',');
            escape_into(out, k, &[',', '=', ' ']);
            out.push('=');
            escape_into(out, v, &[',', '=', ' ']);
        }
        out.push(' ');
        for (i, (k, v)) in fields.iter().enumerate() {
            // Field keys also lose the backslash of `\"` when InfluxDB reads them.
            check_name("field key", k, &[',', '=', ' ', '"'])?;
            if i > 0 {
                out.push(',');
            }
            escape_into(out, k, &[',', '=', ' ']);
            out.push('=');
            match v {
                FieldValue::Float(f) => {
                    if !is_float_literal(f) {
                        return Err(format!("field {k}: {f:?} is not a finite number"));
                    }
                    out.push_str(f);
                }
                FieldValue::Integer(n) => {
                    let _ = write!(out, "{n}i");
                }
                FieldValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                FieldValue::Str(s) => {
                    out.push('"');
                    escape_into(out, s, &['"', '\\']);
                    out.push('"');
                }
            }
        }
        let _ = write!(out, " {timestamp}");
        Ok(())
    })();
    if result.is_err() {
        out.truncate(start);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(m: &str, tags: &[(&str, &str)], fields: &[(&str, FieldValue)]) -> Result<String, String> {
        let mut s = String::new();
        let tags: Vec<(String, String)> = tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let fields: Vec<(String, FieldValue)> = fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        encode_line(&mut s, m, &tags, &fields, 1_700_000_000_000).map(|_| s)
    }

    #[test]
    fn every_escaping_rule() {
        assert_eq!(
            line("m", &[], &[("v", FieldValue::Integer(-5))]).unwrap(),
            "m v=-5i 1700000000000",
            "integers carry i"
        );
        assert_eq!(
            line("row s,x=y", &[("b", "2"), ("a k,=", "v a,l=u")], &[("f i,e=ld", FieldValue::Float("12.30".into()))])
                .unwrap(),
            r"row\ s\,x=y,a\ k\,\==v\ a\,l\=u,b=2 f\ i\,e\=ld=12.30 1700000000000",
            "measurement: comma and space; tags and field keys: comma, equals, space; tags sorted"
        );
        assert_eq!(
            line("m", &[], &[("s", FieldValue::Str(r#"say "hi" \ back"#.into())), ("b", FieldValue::Bool(true))])
                .unwrap(),
            r#"m s="say \"hi\" \\ back",b=true 1700000000000"#,
            "string fields: quotes and backslashes"
        );
        assert_eq!(line("m", &[("empty", "")], &[("v", FieldValue::Bool(false))]).unwrap(), "m v=false 1700000000000");
        assert_eq!(
            line("ünï😀", &[("t", "€")], &[("v", FieldValue::Integer(1))]).unwrap(),
            "ünï😀,t=€ v=1i 1700000000000"
        );
    }

    #[test]
    fn what_cannot_be_carried_is_refused() {
        assert!(line("", &[], &[("v", FieldValue::Integer(1))]).is_err());
        assert!(line("m", &[("t", "a\nb")], &[("v", FieldValue::Integer(1))]).is_err());
        assert!(line("m", &[("t", "ends\\")], &[("v", FieldValue::Integer(1))]).is_err());
        assert!(line("m", &[("t", "a\\,b")], &[("v", FieldValue::Integer(1))]).is_err(), "backslash before a comma");
        assert!(line("m\\ x", &[], &[("v", FieldValue::Integer(1))]).is_err(), "backslash before a space");
        assert!(line("m", &[("t", "a\tb")], &[("v", FieldValue::Integer(1))]).is_err(), "tab");
        assert!(line("m", &[("t", "a\\b")], &[("v", FieldValue::Integer(1))]).is_ok(), "other backslashes are fine");
        assert!(line("m", &[], &[("v", FieldValue::Float("NaN".into()))]).is_err());
        assert!(line("m", &[], &[]).is_err());
        let mut s = String::from("prefix\n");
        assert!(encode_line(&mut s, "m", &[], &[("v".to_string(), FieldValue::Float("inf".into()))], 1).is_err());
        assert_eq!(s, "prefix\n", "a refused point leaves nothing behind");
    }
}
