//! How spillctl shows what the control plane answers: JSON, or aligned
//! tables of chosen columns.

use clap::ValueEnum;
use serde_json::{Value, json};

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq)]
pub enum Output {
    Table,
    Json,
}

/// An object as spillctl shows it: all of it as JSON, and in a table the
/// `COLUMNS`, each a heading and the JSON field under it.
pub trait Shown {
    const COLUMNS: &'static [(&'static str, &'static str)];
    fn json(&self) -> Value;
}

/// One object: a JSON object, or a table of one row.
pub fn one<T: Shown>(out: Output, object: &T) -> String {
    render(out, vec![object.json()], T::COLUMNS)
}

/// A list of objects: a JSON array (however many), or a table.
pub fn list<T: Shown>(out: Output, objects: &[T]) -> String {
    render_list(out, objects.iter().map(T::json).collect(), T::COLUMNS)
}

/// What a delete says: the kind and name of what is gone, and the revision
/// of the delete.
pub fn deleted(out: Output, kind: &str, name: &str, revision: i64) -> String {
    match out {
        Output::Json => json!({"deleted": kind, "name": name, "revision": revision}).to_string(),
        Output::Table => format!("deleted {kind} {name} (revision {revision})"),
    }
}

/// Rows of a list: in JSON always an array, however many rows; else a
/// table as [`render`] makes it.
pub fn render_list(out: Output, rows: Vec<Value>, cols: &[(&str, &str)]) -> String {
    if out == Output::Json {
        return serde_json::to_string_pretty(&Value::Array(rows)).expect("json values serialize");
    }
    render(out, rows, cols)
}

/// Renders rows as JSON (one row as an object, several as an array) or as
/// an aligned table of the given columns.
pub fn render(out: Output, rows: Vec<Value>, cols: &[(&str, &str)]) -> String {
    if out == Output::Json {
        let v = if rows.len() == 1 {
            rows[0].clone()
        } else {
            Value::Array(rows)
        };
        return serde_json::to_string_pretty(&v).expect("json values serialize");
    }
    let cell = |v: &Value, key: &str| -> String {
        match &v[key] {
            Value::String(s) => s.clone(),
            Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => s.clone(),
                    Value::Object(o) if o.contains_key("region") => format!(
                        "{}={}:{}",
                        o["region"].as_str().unwrap_or(""),
                        o["weight"],
                        o["priority"]
                    ),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            Value::Object(o) => o
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(","),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|(_, k)| cell(r, k)).collect())
        .collect();
    let mut widths: Vec<usize> = cols.iter().map(|(h, _)| h.len()).collect();
    for row in &table {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut lines = vec![line(cols.iter().map(|(h, _)| *h).collect())];
    for row in &table {
        lines.push(line(row.iter().map(String::as_str).collect()));
    }
    lines.join("\n")
}
