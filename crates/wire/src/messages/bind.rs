//! Bind ('B'), from the client: a portal over a prepared statement, with
//! parameter values and the formats of parameters and results. The SQLite
//! engine decodes it; the proxy forwards it as bytes.

use crate::frame::cstr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub portal: String,
    pub statement: String,
    /// One format per parameter, already expanded from the zero-or-one
    /// forms (0 = text, 1 = binary).
    pub param_formats: Vec<i16>,
    pub params: Vec<Option<Vec<u8>>>,
    /// As sent: empty (all text), one (for every column) or one per column.
    pub result_formats: Vec<i16>,
}

impl Bind {
    /// The format of result column `i`.
    pub fn result_format(&self, i: usize) -> i16 {
        match self.result_formats.len() {
            0 => 0,
            1 => self.result_formats[0],
            _ => self.result_formats.get(i).copied().unwrap_or(0),
        }
    }
}

fn i16_at(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub fn decode(body: &[u8]) -> Option<Bind> {
    let (portal, rest) = cstr(body)?;
    let (statement, rest) = cstr(rest)?;
    let n_formats = usize::try_from(i16_at(rest, 0)?).ok()?;
    let formats: Vec<i16> = (0..n_formats)
        .map(|i| i16_at(rest, 2 + 2 * i))
        .collect::<Option<_>>()?;
    let mut at = 2 + 2 * n_formats;
    let n_params = usize::try_from(i16_at(rest, at)?).ok()?;
    at += 2;
    let mut params = Vec::with_capacity(n_params);
    for _ in 0..n_params {
        let len = i32::from_be_bytes(rest.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            params.push(None);
        } else {
            let len = len as usize;
            params.push(Some(rest.get(at..at + len)?.to_vec()));
            at += len;
        }
    }
    let n_results = usize::try_from(i16_at(rest, at)?).ok()?;
    let result_formats = (0..n_results)
        .map(|i| i16_at(rest, at + 2 + 2 * i))
        .collect::<Option<_>>()?;
    let param_formats = match formats.len() {
        0 => vec![0; n_params],
        1 => vec![formats[0]; n_params],
        n if n == n_params => formats,
        _ => return None,
    };
    Some(Bind {
        portal: String::from_utf8(portal.to_vec()).ok()?,
        statement: String::from_utf8(statement.to_vec()).ok()?,
        param_formats,
        params,
        result_formats,
    })
}
