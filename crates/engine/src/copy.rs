//! COPY's text and CSV formats: rows written for `COPY … TO STDOUT` and
//! read from `COPY … FROM STDIN`, as PostgreSQL writes and reads them.

/// How COPY spells rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    pub csv: bool,
    pub header: bool,
    pub delimiter: char,
    pub null: String,
    pub quote: char,
}

impl Format {
    pub fn text() -> Format {
        Format {
            csv: false,
            header: false,
            delimiter: '\t',
            null: "\\N".to_string(),
            quote: '"',
        }
    }

    pub fn csv() -> Format {
        Format {
            csv: true,
            header: false,
            delimiter: ',',
            null: String::new(),
            quote: '"',
        }
    }

    /// One row as a line.
    pub fn write_row(&self, values: &[Option<&str>]) -> String {
        let mut line = String::new();
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                line.push(self.delimiter);
            }
            match v {
                None => line.push_str(&self.null),
                Some(v) if self.csv => {
                    let needs = v.is_empty() && self.null.is_empty()
                        || *v == self.null
                        || v.contains([self.delimiter, self.quote, '\n', '\r']);
                    if needs {
                        line.push(self.quote);
                        for c in v.chars() {
                            if c == self.quote {
                                line.push(self.quote);
                            }
                            line.push(c);
                        }
                        line.push(self.quote);
                    } else {
                        line.push_str(v);
                    }
                }
                Some(v) => {
                    for c in v.chars() {
                        match c {
                            '\\' => line.push_str("\\\\"),
                            '\n' => line.push_str("\\n"),
                            '\r' => line.push_str("\\r"),
                            '\t' => line.push_str("\\t"),
                            c if c == self.delimiter => {
                                line.push('\\');
                                line.push(c);
                            }
                            c => line.push(c),
                        }
                    }
                }
            }
        }
        line.push('\n');
        line
    }

    /// Every row of `data`, as fields (None for NULL); the header line is
    /// skipped. An error names the line.
    pub fn read_rows(&self, data: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let mut rows = if self.csv {
            self.read_csv(data)?
        } else {
            self.read_text(data)?
        };
        if self.header && !rows.is_empty() {
            rows.remove(0);
        }
        Ok(rows)
    }

    fn read_text(&self, data: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let mut rows = Vec::new();
        for (n, line) in data.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line == "\\." {
                break;
            }
            if line.is_empty() && n + 1 == data.split('\n').count() {
                continue;
            }
            let mut fields = Vec::new();
            for raw in line.split(self.delimiter) {
                if raw == self.null {
                    fields.push(None);
                    continue;
                }
                let mut out = String::new();
                let mut chars = raw.chars().peekable();
                while let Some(c) = chars.next() {
                    if c != '\\' {
                        out.push(c);
                        continue;
                    }
                    match chars.next() {
                        Some('n') => out.push('\n'),
                        Some('r') => out.push('\r'),
                        Some('t') => out.push('\t'),
                        Some('b') => out.push('\u{8}'),
                        Some('f') => out.push('\u{c}'),
                        Some('v') => out.push('\u{b}'),
                        Some(d @ '0'..='7') => {
                            let mut code = d.to_digit(8).unwrap_or(0);
                            for _ in 0..2 {
                                match chars.peek().and_then(|c| c.to_digit(8)) {
                                    Some(x) => {
                                        code = code * 8 + x;
                                        chars.next();
                                    }
                                    None => break,
                                }
                            }
                            out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                        }
                        Some(other) => out.push(other),
                        None => return Err(format!("line {}: a backslash ends the line", n + 1)),
                    }
                }
                fields.push(Some(out));
            }
            rows.push(fields);
        }
        Ok(rows)
    }

    fn read_csv(&self, data: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let mut rows = Vec::new();
        let mut chars = data.chars().peekable();
        let mut line = 1;
        while chars.peek().is_some() {
            let mut fields = Vec::new();
            loop {
                let mut field = String::new();
                let mut quoted = false;
                if chars.peek() == Some(&self.quote) {
                    quoted = true;
                    chars.next();
                    loop {
                        match chars.next() {
                            Some(c) if c == self.quote => {
                                if chars.peek() == Some(&self.quote) {
                                    field.push(c);
                                    chars.next();
                                } else {
                                    break;
                                }
                            }
                            Some(c) => {
                                if c == '\n' {
                                    line += 1;
                                }
                                field.push(c);
                            }
                            None => {
                                return Err(format!("line {line}: unterminated CSV quoted field"))
                            }
                        }
                    }
                }
                while let Some(&c) = chars.peek() {
                    if c == self.delimiter || c == '\n' || c == '\r' {
                        break;
                    }
                    field.push(c);
                    chars.next();
                }
                fields.push(if !quoted && field == self.null {
                    None
                } else {
                    Some(field)
                });
                match chars.next() {
                    Some(c) if c == self.delimiter => continue,
                    Some('\r') => {
                        if chars.peek() == Some(&'\n') {
                            chars.next();
                        }
                        break;
                    }
                    _ => break,
                }
            }
            line += 1;
            if fields.len() == 1 && fields[0].as_deref() == Some("\\.") {
                break;
            }
            rows.push(fields);
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_rows_round_trip() {
        let f = Format::text();
        let line = f.write_row(&[Some("a\tb\\c\nd"), None, Some("")]);
        assert_eq!(line, "a\\tb\\\\c\\nd\t\\N\t\n");
        let rows = f.read_rows(&line).unwrap();
        assert_eq!(
            rows,
            vec![vec![
                Some("a\tb\\c\nd".to_string()),
                None,
                Some(String::new())
            ]]
        );
    }

    #[test]
    fn csv_rows_round_trip() {
        let f = Format {
            header: true,
            ..Format::csv()
        };
        let line = f.write_row(&[Some("x,\"y\""), None, Some("")]);
        assert_eq!(line, "\"x,\"\"y\"\"\",,\"\"\n");
        let rows = f.read_rows(&format!("a,b,c\n{line}")).unwrap();
        assert_eq!(
            rows,
            vec![vec![Some("x,\"y\"".to_string()), None, Some(String::new())]]
        );
    }
}
