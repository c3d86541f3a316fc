//! ReadyForQuery ('Z'), from the backend (the proxy reads the transaction
//! status) or from the proxy at the end of a login it completed itself.

use super::write_message;
use bytes::{BufMut, BytesMut};

/// Transaction status as ReadyForQuery reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TransactionStatus {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InTransaction),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }
}

pub fn encode(buf: &mut BytesMut, status: TransactionStatus) {
    write_message(buf, b'Z', |b| b.put_u8(status.byte()));
}

pub fn decode(body: &[u8]) -> Option<TransactionStatus> {
    match body {
        [b] => TransactionStatus::from_byte(*b),
        _ => None,
    }
}
