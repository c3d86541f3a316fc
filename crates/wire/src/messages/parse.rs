//! Parse ('P'), from the client: a statement name, its SQL and the
//! parameter types the client fixed (0 = let the server infer). The SQLite
//! engine decodes it; the proxy forwards it as bytes.

use crate::frame::cstr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse {
    pub name: String,
    pub sql: String,
    pub param_types: Vec<u32>,
}

pub fn decode(body: &[u8]) -> Option<Parse> {
    let (name, rest) = cstr(body)?;
    let (sql, rest) = cstr(rest)?;
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let types = rest.get(2..2 + 4 * count)?;
    Some(Parse {
        name: String::from_utf8(name.to_vec()).ok()?,
        sql: String::from_utf8(sql.to_vec()).ok()?,
        param_types: types
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    })
}
