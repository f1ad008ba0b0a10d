//! What the commands print and how: the `--output` formats, [`Out`] (a result in both
//! renderings), aligned fields and tables, times, dashes for empty values, and the comma lists
//! users type.

use std::io::Write as _;

use serde_json::{Value, json};

use super::error::CliError;
pub(crate) use crate::model::time::rfc3339;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned `field  value` lines, or a header row plus rows for lists.
    Table,
    /// One JSON document; bytes as standard base64, times as Unix seconds.
    Json,
}

/// What a command prints: both renderings, the caller picks one.
pub(crate) struct Out {
    /// The `--output json` document.
    pub(crate) json: Value,
    /// The `--output table` text, newline-terminated.
    pub(crate) table: String,
}

impl Out {
    /// `deleted {what} {name}` / `{"deleted": name}`.
    pub(crate) fn deleted(what: &str, name: String) -> Out {
        Out { table: format!("deleted {what} {name}\n"), json: json!({ "deleted": name }) }
    }

    /// Prints the rendering `output` asks for on stdout (a closed pipe is not an error).
    pub(crate) fn print(&self, output: Output) -> Result<(), CliError> {
        let text = match output {
            Output::Json => format!("{:#}\n", self.json),
            Output::Table => self.table.clone(),
        };
        write_stdout(&text).map(drop)
    }
}

/// Writes and flushes `text` on stdout; false when stdout is a closed pipe.
pub(crate) fn write_stdout(text: &str) -> Result<bool, CliError> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(CliError::io(std::path::Path::new("stdout"))(e)),
    }
}

/// A listing: per item a JSON document, and a table row under `header`.
pub(crate) fn list_out<T>(
    items: &[T],
    json: impl Fn(&T) -> Value,
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> Out {
    Out { json: json_array(items, json), table: table(header, items.iter().map(row).collect()) }
}

/// A JSON array of one document per item.
pub(crate) fn json_array<T>(items: &[T], json: impl Fn(&T) -> Value) -> Value {
    Value::Array(items.iter().map(json).collect())
}

/// A JSON object of some fields of a value under their own names: `json_fields!(v; name, uri)`
/// is `json!({ "name": v.name, "uri": v.uri })`.
macro_rules! json_fields {
    ($value:expr; $($field:ident),+ $(,)?) => {
        serde_json::json!({ $(stringify!($field): $value.$field),+ })
    };
}
pub(crate) use json_fields;

/// `field  value` lines with the values aligned.
pub(crate) fn fields<K: AsRef<str>>(rows: &[(K, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.as_ref().chars().count()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{:<width$}  {v}\n", k.as_ref())).collect()
}

/// A header row and rows, columns aligned; the last column is not padded.
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        text.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The text, or `-` when it is empty.
pub(crate) fn dash(text: &str) -> String {
    if text.is_empty() { "-".to_string() } else { text.to_string() }
}

/// The items joined by `, `, or `-` when there are none.
pub(crate) fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() { "-".to_string() } else { items.join(", ") }
}

/// A vault name, or `*` for the empty name that stands for every vault.
pub(crate) fn vault_or_star(name: &str) -> String {
    if name.is_empty() { "*".to_string() } else { name.to_string() }
}

/// The last `/` segment of a resource id: its name.
pub(crate) fn leaf(id: &str) -> String {
    id.rsplit('/').next().unwrap_or_default().to_string()
}

/// Unix seconds with their UTC rendering: `1800000000 (2027-01-15T08:00:00Z)`.
pub(crate) fn when(t: i64) -> String {
    format!("{t} ({})", rfc3339(t))
}

/// [`when`], or `-` when there is no time.
pub(crate) fn when_opt(t: Option<i64>) -> String {
    t.map_or_else(|| "-".to_string(), when)
}

/// [`rfc3339`], or `-` when there is no time.
pub(crate) fn rfc3339_opt(t: Option<i64>) -> String {
    t.map_or_else(|| "-".to_string(), rfc3339)
}

/// Splits a comma list, dropping blanks: "" is the empty list.
pub(crate) fn comma_list(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// Trims the items of a clap-split list and drops blanks.
pub(crate) fn clean_list(items: Vec<String>) -> Vec<String> {
    items.iter().flat_map(|s| comma_list(s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_align_values() {
        let text = fields(&[("id", "1".to_string()), ("long name", "2".to_string())]);
        assert_eq!(text, "id         1\nlong name  2\n");
    }

    #[test]
    fn tables_pad_all_but_the_last_column() {
        let text = table(&["A", "BB"], vec![vec!["xyz".into(), "1".into()], vec!["".into(), "".into()]]);
        assert_eq!(text, "A    BB\nxyz  1\n\n");
    }

    #[test]
    fn lists_and_dashes() {
        assert_eq!(clean_list(vec![" a, b".into(), "".into(), "c ,".into()]), ["a", "b", "c"]);
        assert!(comma_list(" , ").is_empty());
        assert_eq!((dash(""), list_or_dash(&[])), ("-".to_string(), "-".to_string()));
        assert_eq!(when(1_800_000_000), "1800000000 (2027-01-15T08:00:00Z)");
        assert_eq!((vault_or_star(""), leaf("/a/b/c")), ("*".to_string(), "c".to_string()));
    }
}
