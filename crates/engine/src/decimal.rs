//! Exact decimal arithmetic for `numeric`, so sums and averages over values
//! the file stores as REAL come out as PostgreSQL's numeric gives them
//! (0.1 + 0.2 = 0.3), with PostgreSQL's result scale for division.

use std::cmp::Ordering;

/// `m / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    m: i128,
    scale: u32,
}

fn pow10(n: u32) -> Option<i128> {
    10i128.checked_pow(n)
}

impl Decimal {
    pub fn zero() -> Decimal {
        Decimal { m: 0, scale: 0 }
    }

    pub fn from_int(i: i64) -> Decimal {
        Decimal {
            m: i128::from(i),
            scale: 0,
        }
    }

    /// A double by its shortest exact spelling (what the app wrote).
    pub fn from_f64(f: f64) -> Option<Decimal> {
        if !f.is_finite() {
            return None;
        }
        Decimal::parse(&format!("{f}"))
    }

    pub fn parse(text: &str) -> Option<Decimal> {
        let t = text.trim();
        let (negative, digits) = match t.as_bytes().first()? {
            b'-' => (true, &t[1..]),
            b'+' => (false, &t[1..]),
            _ => (false, t),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        if (whole.is_empty() && fraction.is_empty())
            || !whole
                .bytes()
                .chain(fraction.bytes())
                .all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let mut m: i128 = 0;
        for b in whole.bytes().chain(fraction.bytes()) {
            m = m.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
        }
        Some(Decimal {
            m: if negative { -m } else { m },
            scale: fraction.len() as u32,
        })
    }

    fn rescale(self, scale: u32) -> Option<Decimal> {
        Some(Decimal {
            m: self.m.checked_mul(pow10(scale.checked_sub(self.scale)?)?)?,
            scale,
        })
    }

    pub fn add(self, other: Decimal) -> Option<Decimal> {
        let scale = self.scale.max(other.scale);
        let (a, b) = (self.rescale(scale)?, other.rescale(scale)?);
        Some(Decimal {
            m: a.m.checked_add(b.m)?,
            scale,
        })
    }

    pub fn negated(self) -> Decimal {
        Decimal {
            m: -self.m,
            scale: self.scale,
        }
    }

    pub fn mul(self, other: Decimal) -> Option<Decimal> {
        Some(Decimal {
            m: self.m.checked_mul(other.m)?,
            scale: self.scale + other.scale,
        })
    }

    /// Base-10000 weight and leading digit of a nonzero value, as
    /// PostgreSQL's numeric stores it.
    fn weight_and_first_digit(self) -> (i32, i128) {
        let abs = self.m.unsigned_abs();
        let text = abs.to_string();
        let scale = self.scale as usize;
        let (whole, fraction) = if text.len() > scale {
            (
                text[..text.len() - scale].to_string(),
                text[text.len() - scale..].to_string(),
            )
        } else {
            (
                "0".to_string(),
                format!("{}{text}", "0".repeat(scale - text.len())),
            )
        };
        let whole = whole.trim_start_matches('0');
        if !whole.is_empty() {
            let groups = whole.len().div_ceil(4);
            let lead = whole.len() - (groups - 1) * 4;
            (groups as i32 - 1, whole[..lead].parse().unwrap_or(0))
        } else {
            let padded = format!("{fraction}{}", "0".repeat((4 - fraction.len() % 4) % 4));
            for (i, group) in padded.as_bytes().chunks(4).enumerate() {
                let g: i128 = std::str::from_utf8(group)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                if g != 0 {
                    return (-(i as i32) - 1, g);
                }
            }
            (0, 0)
        }
    }

    /// `self / other` at PostgreSQL's result scale (select_div_scale).
    pub fn div(self, other: Decimal) -> Option<Decimal> {
        if other.m == 0 {
            return None;
        }
        let (w1, d1) = if self.m == 0 {
            (0, 0)
        } else {
            self.weight_and_first_digit()
        };
        let (w2, d2) = other.weight_and_first_digit();
        let mut qweight = w1 - w2;
        if d1 <= d2 {
            qweight -= 1;
        }
        let rscale = (16 - qweight * 4)
            .max(self.scale as i32)
            .max(other.scale as i32)
            .clamp(0, 1000) as u32;
        // m = self.m * 10^(rscale + other.scale - self.scale) / other.m,
        // rounded half away from zero.
        let shift = rscale as i64 + other.scale as i64 - self.scale as i64;
        let (num, den) = if shift >= 0 {
            (self.m.checked_mul(pow10(shift as u32)?)?, other.m)
        } else {
            (self.m, other.m.checked_mul(pow10((-shift) as u32)?)?)
        };
        let q = num / den;
        let r = num % den;
        let round = match (2 * r.abs()).cmp(&den.abs()) {
            Ordering::Less => 0,
            _ => 1,
        };
        let sign = if (num < 0) != (den < 0) { -1 } else { 1 };
        Some(Decimal {
            m: q + sign * round,
            scale: rscale,
        })
    }

    pub fn to_text(self) -> String {
        let negative = self.m < 0;
        let digits = self.m.unsigned_abs().to_string();
        let scale = self.scale as usize;
        let text = if scale == 0 {
            digits
        } else if digits.len() > scale {
            format!(
                "{}.{}",
                &digits[..digits.len() - scale],
                &digits[digits.len() - scale..]
            )
        } else {
            format!("0.{}{digits}", "0".repeat(scale - digits.len()))
        };
        if negative {
            format!("-{text}")
        } else {
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_doubles_exactly() {
        let s = Decimal::from_f64(0.1)
            .unwrap()
            .add(Decimal::from_f64(0.2).unwrap())
            .unwrap();
        assert_eq!(s.to_text(), "0.3");
    }

    #[test]
    fn divides_at_postgresql_scale() {
        let avg = |sum: i64, n: i64| {
            Decimal::from_int(sum)
                .div(Decimal::from_int(n))
                .unwrap()
                .to_text()
        };
        assert_eq!(avg(419_514, 75), "5593.5200000000000000");
        assert_eq!(avg(10, 4), "2.5000000000000000");
        assert_eq!(avg(1, 3), "0.33333333333333333333");
        assert_eq!(avg(-7, 2), "-3.5000000000000000");
        assert_eq!(
            Decimal::parse("149.99")
                .unwrap()
                .div(Decimal::from_int(2))
                .unwrap()
                .to_text(),
            "74.9950000000000000"
        );
    }
}
