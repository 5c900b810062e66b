//! JSON values printed exactly the way QEMU prints them.
//!
//! qemu-img builds its JSON output from QAPI structs through a hash table (QDict) and prints
//! it with its own pretty-printer: four-space indents, keys in the hash table's bucket order,
//! empty containers split over two lines, non-ASCII as `\uXXXX`. Scripts that diff qemu-img's
//! output as text see the same text from diskit because this module reproduces that order
//! (the bucket of each key under QEMU's string hash) and that layout.

use std::fmt::Write;

/// A JSON value with insertion-ordered objects.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    UInt(u64),
    /// A floating point number.
    Float(f64),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object (keys in insertion order; printing reorders them as QEMU does).
    Obj(Obj),
}

/// An object: keys in insertion order, the order of QEMU's QAPI schema.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Obj(pub Vec<(String, Json)>);

impl Obj {
    /// An empty object.
    pub fn new() -> Self {
        Obj(Vec::new())
    }
    /// Adds a member (builder style).
    pub fn with(mut self, key: &str, value: impl Into<Json>) -> Self {
        self.push(key, value);
        self
    }
    /// Adds a member if `value` is `Some`.
    pub fn with_opt<T: Into<Json>>(mut self, key: &str, value: Option<T>) -> Self {
        if let Some(v) = value {
            self.push(key, v);
        }
        self
    }
    /// Adds a member.
    pub fn push(&mut self, key: &str, value: impl Into<Json>) {
        self.0.push((key.to_string(), value.into()));
    }
    /// Looks a member up.
    pub fn get(&self, key: &str) -> Option<&Json> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// The members in the order QEMU's QDict iterates them.
    pub fn qemu_order(&self) -> Vec<&(String, Json)> {
        let mut v: Vec<(usize, u32, &(String, Json))> = self
            .0
            .iter()
            .enumerate()
            .map(|(i, kv)| (i, qdict_bucket(&kv.0), kv))
            .collect();
        // Within a bucket QDict prepends, so the last inserted comes first.
        v.sort_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
        v.into_iter().map(|(_, _, kv)| kv).collect()
    }
}

macro_rules! from_int {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for Json { fn from(x: $t) -> Json { Json::$v(x as _) } }
    )*};
}
from_int!(u64 => UInt, u32 => UInt, usize => UInt, i64 => Int, i32 => Int);

impl From<bool> for Json {
    fn from(b: bool) -> Json {
        Json::Bool(b)
    }
}
impl From<&str> for Json {
    fn from(s: &str) -> Json {
        Json::Str(s.to_string())
    }
}
impl From<String> for Json {
    fn from(s: String) -> Json {
        Json::Str(s)
    }
}
impl From<Obj> for Json {
    fn from(o: Obj) -> Json {
        Json::Obj(o)
    }
}
impl From<Vec<Json>> for Json {
    fn from(v: Vec<Json>) -> Json {
        Json::Arr(v)
    }
}
impl From<f64> for Json {
    fn from(x: f64) -> Json {
        Json::Float(x)
    }
}

const QDICT_BUCKETS: u32 = 512;

/// The bucket QEMU's QDict puts `key` in (its string hash modulo the table size).
pub fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add((b as u32) << ((i as u32 * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKETS
}

fn indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) > 0xFFFF => {
                let cp = c as u32 - 0x10000;
                let _ = write!(
                    out,
                    "\\u{:04X}\\u{:04X}",
                    0xD800 + (cp >> 10),
                    0xDC00 + (cp & 0x3FF)
                );
            }
            c if (c as u32) < 0x20 || (c as u32) >= 0x7F => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_value(out: &mut String, v: &Json, level: usize, pretty: bool) {
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Json::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        Json::Float(f) => {
            let _ = write!(out, "{}", format_g17(*f));
        }
        Json::Str(s) => write_str(out, s),
        Json::Arr(items) => {
            out.push('[');
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push_str(if pretty { "," } else { ", " });
                }
                if pretty {
                    out.push('\n');
                    indent(out, level + 1);
                }
                write_value(out, item, level + 1, pretty);
            }
            if pretty {
                out.push('\n');
                indent(out, level);
            }
            out.push(']');
        }
        Json::Obj(obj) => {
            out.push('{');
            for (n, (k, item)) in obj.qemu_order().into_iter().enumerate() {
                if n > 0 {
                    out.push_str(if pretty { "," } else { ", " });
                }
                if pretty {
                    out.push('\n');
                    indent(out, level + 1);
                }
                write_str(out, k);
                out.push_str(": ");
                write_value(out, item, level + 1, pretty);
            }
            if pretty {
                out.push('\n');
                indent(out, level);
            }
            out.push('}');
        }
    }
}

/// QEMU prints floating point numbers with `%.17g`.
fn format_g17(f: f64) -> String {
    if f == f.trunc() && f.abs() < 1e17 {
        return format!("{}", f as i64);
    }
    format!("{f}")
}

/// Pretty-prints like `qobject_to_json_pretty` (no trailing newline).
pub fn to_pretty(v: &Json) -> String {
    let mut out = String::new();
    write_value(&mut out, v, 0, true);
    out
}

/// Prints on one line like `qobject_to_json`.
pub fn to_compact(v: &Json) -> String {
    let mut out = String::new();
    write_value(&mut out, v, 0, false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_matches_qemu_img_info() {
        // The order qemu-img 10 prints an image's info in.
        let obj = Obj::new()
            .with("filename", "a")
            .with("format", "qcow2")
            .with("dirty-flag", false)
            .with("actual-size", 1u64)
            .with("virtual-size", 1u64)
            .with("cluster-size", 1u64)
            .with("backing-filename", "b")
            .with("full-backing-filename", "b")
            .with("backing-filename-format", "qcow2")
            .with("format-specific", Obj::new())
            .with("children", Vec::<Json>::new());
        let keys: Vec<&str> = obj.qemu_order().iter().map(|kv| kv.0.as_str()).collect();
        assert_eq!(
            keys,
            [
                "children",
                "backing-filename-format",
                "virtual-size",
                "filename",
                "cluster-size",
                "format",
                "actual-size",
                "format-specific",
                "full-backing-filename",
                "backing-filename",
                "dirty-flag"
            ]
        );
    }

    #[test]
    fn layout_matches_qemu() {
        let v = Json::Obj(
            Obj::new()
                .with("children", Vec::<Json>::new())
                .with("data", Obj::new())
                .with("s", "é\n\"x"),
        );
        let text = to_pretty(&v);
        assert!(text.contains("\"children\": [\n    ]"), "{text}");
        assert!(text.contains("\"data\": {\n    }"), "{text}");
        assert!(text.contains("\"s\": \"\\u00E9\\n\\\"x\""), "{text}");
    }
}
