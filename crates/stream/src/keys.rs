//! Primary keys as the copy and verify use them: which columns, their
//! types, and keyset ranges (`(k1, k2) > (...) AND (k1, k2) <= (...)`).

use crate::applier::{quote_ident, quote_literal};
use crate::preconditions::TableShape;
use crate::StreamError;
use tokio_postgres::Client;

/// The primary-key columns of a table, in key order.
async fn key_columns(client: &Client, table: &TableShape) -> Result<Vec<String>, StreamError> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::text::regclass AND i.indisprimary \
             ORDER BY array_position(i.indkey, a.attnum)",
            &[&table.qualified()],
        )
        .await?;
    let keys: Vec<String> = rows.into_iter().map(|r| r.get(0)).collect();
    if keys.is_empty() {
        return Err(StreamError::Precondition(format!(
            "table {} has no primary key; verify compares rows by key",
            table.qualified()
        )));
    }
    Ok(keys)
}

/// SQL pieces for one table.
pub struct Shape {
    pub table: String,
    pub keys: Vec<String>,
    /// Each key column's type, for casting key literals.
    pub types: Vec<String>,
    /// `("k1", "k2")`
    pub key_tuple: String,
    /// `"k1"::text, "k2"::text`
    pub key_text: String,
}

impl Shape {
    /// `(lit::text::type, ...)` for key values.
    fn literal(&self, vals: &[String]) -> String {
        let parts: Vec<String> = self
            .types
            .iter()
            .zip(vals)
            .map(|(t, v)| format!("{}::text::{t}", quote_literal(v)))
            .collect();
        format!("({})", parts.join(", "))
    }

    /// The rows with these keys (each a list of key values).
    pub fn key_in(&self, keys: &[Vec<String>]) -> String {
        let list: Vec<String> = keys.iter().map(|k| self.literal(k)).collect();
        format!("{} IN ({})", self.key_tuple, list.join(", "))
    }

    pub fn range(&self, after: Option<&[String]>, upto: Option<&[String]>) -> String {
        let literal = |vals: &[String]| self.literal(vals);
        let mut conds = Vec::new();
        if let Some(a) = after {
            conds.push(format!("{} > {}", self.key_tuple, literal(a)));
        }
        if let Some(u) = upto {
            conds.push(format!("{} <= {}", self.key_tuple, literal(u)));
        }
        if conds.is_empty() {
            "true".to_string()
        } else {
            conds.join(" AND ")
        }
    }
}

/// Key literals are cast through text to the key column's type, so that
/// comparisons use the column's own ordering.
pub async fn shape(client: &Client, table: &TableShape) -> Result<Shape, StreamError> {
    let keys = key_columns(client, table).await?;
    let types: Vec<String> = keys
        .iter()
        .map(|k| {
            table
                .columns
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, t)| t.clone())
                .unwrap_or_else(|| "text".to_string())
        })
        .collect();
    let quoted: Vec<String> = keys.iter().map(|k| quote_ident(k)).collect();
    Ok(Shape {
        table: table.qualified(),
        key_tuple: format!("({})", quoted.join(", ")),
        key_text: quoted
            .iter()
            .map(|k| format!("{k}::text"))
            .collect::<Vec<_>>()
            .join(", "),
        keys,
        types,
    })
}
