//! `-o key=value` options and sizes, parsed as QEMU parses them.

use crate::error::{Error, Result};

/// The type of an option, as `-o help` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptKind {
    /// A byte size with optional suffix (`<size>`).
    Size,
    /// on/off (`<bool (on/off)>`).
    Bool,
    /// A plain number (`<num>`).
    Number,
    /// A string (`<str>`).
    Str,
}

impl OptKind {
    fn help_name(self) -> &'static str {
        match self {
            OptKind::Size => "<size>",
            OptKind::Bool => "<bool (on/off)>",
            OptKind::Number => "<num>",
            OptKind::Str => "<str>",
        }
    }
}

/// One create option of a format.
#[derive(Debug, Clone, Copy)]
pub struct OptDesc {
    /// Name as given to `-o`.
    pub name: &'static str,
    /// Type.
    pub kind: OptKind,
    /// Help text shown by `-o help`.
    pub help: &'static str,
}

impl OptDesc {
    /// One line of `-o help`.
    pub fn help_line(&self) -> String {
        let left = format!("{}={}", self.name, self.kind.help_name());
        format!("  {left:<22} - {}", self.help)
    }
}

/// Parsed `-o` options (later assignments win), plus the size argument.
#[derive(Debug, Clone, Default)]
pub struct CreateOpts {
    values: Vec<(String, String)>,
    unsafe_backing: bool,
}

impl CreateOpts {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses an option string like `cluster_size=64k,lazy_refcounts=on` (`,,` is a comma).
    pub fn parse(s: &str) -> Result<CreateOpts> {
        let mut o = CreateOpts::new();
        o.merge(s)?;
        Ok(o)
    }

    /// Adds the options of another `-o` string.
    pub fn merge(&mut self, s: &str) -> Result<()> {
        for item in split_opts(s) {
            if item.is_empty() {
                continue;
            }
            match item.split_once('=') {
                Some((k, v)) => self.set(k, v),
                None => {
                    // A bare key means key=on; `nokey` means key=off for booleans in QemuOpts.
                    self.set(&item, "on")
                }
            }
        }
        Ok(())
    }

    /// Sets one option.
    pub fn set(&mut self, key: &str, value: &str) {
        self.values.retain(|(k, _)| k != key);
        self.values.push((key.to_string(), value.to_string()));
    }

    /// Removes an option.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let pos = self.values.iter().position(|(k, _)| k == key)?;
        Some(self.values.remove(pos).1)
    }

    /// A raw string value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// All options in the order given.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `create -u`: do not open the backing file (the size is given).
    pub fn set_unsafe_backing(&mut self, v: bool) {
        self.unsafe_backing = v;
    }

    /// Was `-u` given?
    pub fn unsafe_backing(&self) -> bool {
        self.unsafe_backing
    }

    /// Does the user ask for help (`-o help` or `-o ?`)?
    pub fn wants_help(&self) -> bool {
        self.values.iter().any(|(k, _)| k == "help" || k == "?")
    }

    /// A boolean option (`on`/`off`, also `yes`/`no`, `true`/`false`).
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_bool(key, v).map(Some),
        }
    }

    /// A size option.
    pub fn get_size(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_size(v).map(Some).map_err(|e| match e {
                SizeError::Range => Error::invalid_arg(format!(
                    "Value '{v}' is out of range for parameter '{key}'"
                )),
                SizeError::Invalid => Error::invalid_arg(format!(
                    "Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
                )),
            }),
        }
    }

    /// A number option.
    pub fn get_number(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_number(key, v).map(Some),
        }
    }

    /// Checks the options in the order given as qemu parses an `-o` string: the first one not
    /// in `known`, or whose value does not read as its type, fails with qemu's message
    /// (prefixed with `filename`).
    pub fn check_typed<'a>(
        &self,
        known: impl Iterator<Item = &'a OptDesc> + Clone,
        filename: &str,
    ) -> Result<()> {
        for (k, v) in &self.values {
            let Some(d) = known.clone().find(|d| d.name == k) else {
                return Err(Error::invalid_arg(format!(
                    "{filename}: Invalid parameter '{k}'"
                )));
            };
            let one = CreateOpts {
                values: vec![(k.clone(), v.clone())],
                unsafe_backing: false,
            };
            let r = match d.kind {
                OptKind::Size => one.get_size(k).map(|_| ()),
                OptKind::Bool => one.get_bool(k).map(|_| ()),
                OptKind::Number => one.get_number(k).map(|_| ()),
                OptKind::Str => Ok(()),
            };
            r.map_err(|e| e.context(filename))?;
        }
        Ok(())
    }

    /// Fails with qemu's message on the first option not in `known`.
    pub fn check_known(&self, known: &[OptDesc], filename: &str) -> Result<()> {
        for (k, _) in &self.values {
            if !known.iter().any(|d| d.name == k) {
                return Err(Error::invalid_arg(format!(
                    "{filename}: Invalid parameter '{k}'"
                )));
            }
        }
        Ok(())
    }
}

/// Splits a QemuOpts string on commas, with `,,` standing for a literal comma.
pub fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// Parses QEMU's boolean words.
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(Error::invalid_arg(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

/// Why a size did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with a known suffix.
    Invalid,
    /// Negative, or too large for 64 bits.
    Range,
}

/// Parses a size like qemu's `qemu_strtosz`: a decimal number (a fraction allowed) or a hex
/// integer, with an optional suffix B, k/K, M, G, T, P, E (powers of 1024). Bytes by default.
pub fn parse_size(s: &str) -> std::result::Result<u64, SizeError> {
    parse_size_default(s, 1)
}

/// Like [`parse_size`] with a unit for suffix-less numbers.
pub fn parse_size_default(s: &str, default_unit: u64) -> std::result::Result<u64, SizeError> {
    let s = s.trim_start();
    if let Some(neg) = s.strip_prefix('-') {
        // qemu: a negative number is out of range when only digits follow the sign ("-5");
        // "-1k" or "-1.5" are invalid
        return if !neg.is_empty() && neg.bytes().all(|b| b.is_ascii_digit()) {
            Err(SizeError::Range)
        } else {
            Err(SizeError::Invalid)
        };
    }
    if s.is_empty() {
        return Err(SizeError::Invalid);
    }
    let (num_part, suffix) = {
        let hex = s.starts_with("0x") || s.starts_with("0X");
        let end = if hex {
            2 + s[2..]
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(s.len() - 2)
        } else {
            s.find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(s.len())
        };
        (&s[..end], &s[end..])
    };
    let unit: u64 = match suffix {
        "" => default_unit,
        "B" | "b" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        "P" | "p" => 1 << 50,
        "E" | "e" => 1 << 60,
        _ => return Err(SizeError::Invalid),
    };
    if let Some(hex) = num_part
        .strip_prefix("0x")
        .or_else(|| num_part.strip_prefix("0X"))
    {
        // a hexadecimal number takes no suffix in qemu ("0x10k" is invalid)
        if hex.is_empty() || !suffix.is_empty() {
            return Err(SizeError::Invalid);
        }
        let v = u64::from_str_radix(hex, 16).map_err(|_| SizeError::Invalid)?;
        return v.checked_mul(unit).ok_or(SizeError::Range);
    }
    let (int_s, frac_s) = match num_part.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num_part, ""),
    };
    if int_s.is_empty() && frac_s.is_empty() {
        return Err(SizeError::Invalid);
    }
    if frac_s.contains('.') {
        return Err(SizeError::Invalid);
    }
    let int: u64 = if int_s.is_empty() {
        0
    } else {
        int_s.parse().map_err(|_| {
            if int_s.bytes().all(|b| b.is_ascii_digit()) {
                SizeError::Range
            } else {
                SizeError::Invalid
            }
        })?
    };
    let mut total = int.checked_mul(unit).ok_or(SizeError::Range)?;
    if !frac_s.is_empty() {
        // fraction * unit, computed exactly enough for 19 digits of fraction
        let digits = &frac_s[..frac_s.len().min(18)];
        let frac: u128 = digits.parse().map_err(|_| SizeError::Invalid)?;
        let scale = 10u128.pow(digits.len() as u32);
        let part = frac * unit as u128 / scale;
        total = total.checked_add(part as u64).ok_or(SizeError::Range)?;
    }
    Ok(total)
}

/// `fmt=NAME` followed by `key=value` for every option of `descs` (in that order) that is
/// set, the way qemu-img announces a new image. Sizes are printed in bytes.
pub fn summary(fmt: &str, descs: &[OptDesc], opts: &CreateOpts) -> String {
    let mut s = format!("fmt={fmt}");
    for d in descs {
        if let Some(v) = opts.get(d.name) {
            let v = match d.kind {
                OptKind::Size => parse_size(v)
                    .map(|n| n.to_string())
                    .unwrap_or(v.to_string()),
                OptKind::Bool => match parse_bool(d.name, v) {
                    Ok(true) => "on".to_string(),
                    Ok(false) => "off".to_string(),
                    Err(_) => v.to_string(),
                },
                _ => v.to_string(),
            };
            s.push_str(&format!(" {}={}", d.name, v));
        }
    }
    s
}

/// Parses a number option the way QEMU's option parser does (`strtoull` with base 0:
/// leading blanks, a sign, `0x` hex and `0` octal; a negative number wraps around).
pub fn parse_number(key: &str, value: &str) -> Result<u64> {
    let t = value.trim_start();
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (digits, radix) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    let not_number = || Error::invalid_arg(format!("Parameter '{key}' expects a number"));
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(not_number());
    }
    let n = u64::from_str_radix(digits, radix).map_err(|_| {
        Error::invalid_arg(format!(
            "Value '{value}' is too large for parameter '{key}'"
        ))
    })?;
    Ok(if neg { n.wrapping_neg() } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("0x200"), Ok(512));
        assert_eq!(parse_size("1Q"), Err(SizeError::Invalid));
        assert_eq!(parse_size("-1"), Err(SizeError::Range));
        assert_eq!(parse_size("16E"), Err(SizeError::Range));
        assert_eq!(parse_size(""), Err(SizeError::Invalid));
    }

    #[test]
    fn opts() {
        let o = CreateOpts::parse("a=1,b=x,,y,c").unwrap();
        assert_eq!(o.get("a"), Some("1"));
        assert_eq!(o.get("b"), Some("x,y"));
        assert_eq!(o.get_bool("c").unwrap(), Some(true));
    }
}
