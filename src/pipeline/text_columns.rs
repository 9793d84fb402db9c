//! `text_columns`: binary columns (PostgreSQL `bytea`, DynamoDB `B`) that hold UTF-8 text in a
//! legacy schema, declared by the pipeline so filters, transforms and sinks see text instead of
//! bytes. Decoding is strict: a value that is not valid UTF-8 is never replaced lossily (that
//! would put U+FFFD into the derived stores without anyone knowing); the change goes to the
//! DLQ naming the column, the byte offset and the key, and the stream goes on.

use crate::change::{Change, Name, Row, Value};

/// Decode the declared columns of `change` in its key, before and after images.
///
/// `Ok(None)` when nothing needed decoding (the change is used as it is, no copy is made).
pub fn decode(change: &Change, columns: &[Name]) -> Result<Option<Change>, String> {
    if columns.is_empty() {
        return Ok(None); // the common case, on every change: no work
    }
    let needs = |row: &Row| columns.iter().any(|c| matches!(row.get(c), Some(Value::Bytes(_))));
    let rows = [Some(&change.key), change.before.as_ref(), change.after.as_ref()];
    if !rows.into_iter().flatten().any(needs) {
        return Ok(None);
    }
    let mut out = change.clone();
    for (image, row) in [("key", Some(&mut out.key)), ("before", out.before.as_mut()), ("after", out.after.as_mut())] {
        let Some(row) = row else { continue };
        for column in columns {
            let Some(value) = row.get_mut(column) else { continue };
            let Value::Bytes(bytes) = value else { continue };
            match String::from_utf8(std::mem::take(bytes)) {
                Ok(text) => *value = Value::Text(text),
                Err(e) => {
                    let at = e.utf8_error().valid_up_to();
                    return Err(format!(
                        "{image}.{column} of {} ({}) is declared in text_columns but is not valid UTF-8: \
                         invalid byte 0x{:02x} at offset {at} of {} bytes",
                        change.relation,
                        change.key_display(),
                        e.as_bytes()[at],
                        e.as_bytes().len(),
                    ));
                }
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(body: Vec<u8>) -> Change {
        let mut key = Row::default();
        key.push("id".into(), Value::Int(7));
        let mut after = Row::default();
        after.push("id".into(), Value::Int(7));
        after.push("body".into(), Value::Bytes(body));
        after.push("raw".into(), Value::Bytes(vec![0xff]));
        Change::test_insert("public.notes", key, Some(after))
    }

    #[test]
    fn declared_utf8_bytes_become_text_and_others_stay_bytes() {
        let c = decode(&change("héllo 😀".as_bytes().to_vec()), &["body".into()]).unwrap().unwrap();
        let after = c.after.as_ref().unwrap();
        assert_eq!(after.get("body"), Some(&Value::Text("héllo 😀".into())));
        assert_eq!(after.get("raw"), Some(&Value::Bytes(vec![0xff])), "undeclared columns keep their bytes");
        assert_eq!(after.get("id"), Some(&Value::Int(7)));
    }

    #[test]
    fn invalid_utf8_is_an_error_naming_column_offset_and_key() {
        let e = decode(&change(b"ok\xc3\x28".to_vec()), &["body".into()]).unwrap_err();
        assert!(e.contains("after.body of public.notes (id=7)"), "{e}");
        assert!(e.contains("invalid byte 0xc3 at offset 2 of 4 bytes"), "{e}");
    }

    #[test]
    fn nothing_to_decode_makes_no_copy() {
        assert!(decode(&change(b"x".to_vec()), &["missing".into()]).unwrap().is_none());
    }
}
