//! The text descriptor: `key=value` lines, extent lines and the disk database.

use crate::error::{Error, Result};

/// The largest descriptor diskit reads (a text file or the embedded area).
pub const MAX_DESC_SIZE: u64 = crate::limits::VMDK_MAX_DESCRIPTOR_BYTES;
/// The most extents one descriptor may list.
pub const MAX_EXTENTS: usize = crate::limits::VMDK_MAX_EXTENTS;

/// Access mode of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub enum Access {
    /// Read-write.
    Rw,
    /// Read-only.
    RdOnly,
    /// No access (refused).
    NoAccess,
}

/// One extent line, e.g. `RW 4192256 FLAT "disk-flat.vmdk" 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Size in sectors.
    pub sectors: u64,
    /// Type: FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, ...
    pub kind: String,
    /// File name as written (absent for ZERO).
    pub file: Option<String>,
    /// Offset in sectors into the file (FLAT).
    pub offset: u64,
}

/// What diskit needs from a descriptor.
#[derive(Debug, Clone, Default)]
pub struct Descriptor {
    /// The text, cut at the first NUL.
    pub text: String,
    /// Content ID.
    pub cid: Option<u32>,
    /// Parent content ID.
    pub parent_cid: Option<u32>,
    /// `createType`.
    pub create_type: Option<String>,
    /// `parentFileNameHint`.
    pub parent_hint: Option<String>,
    /// Extent lines in order.
    pub extents: Vec<ExtentLine>,
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
}

/// Does `line` start like an extent line (access word, blank, digit)?
fn looks_like_extent(line: &str) -> Option<Access> {
    let (word, rest) = line.split_once(|c: char| c.is_ascii_whitespace())?;
    let access = match word {
        "RW" => Access::Rw,
        "RDONLY" => Access::RdOnly,
        "NOACCESS" => Access::NoAccess,
        _ => return None,
    };
    rest.trim_start()
        .starts_with(|c: char| c.is_ascii_digit() || c == '-')
        .then_some(access)
}

fn parse_extent(line: &str, access: Access) -> Result<ExtentLine> {
    let bad = || Error::invalid_image(format!("Invalid extent line: {line}"));
    let mut rest = line
        .split_once(|c: char| c.is_ascii_whitespace())
        .ok_or_else(bad)?
        .1;
    let next_word = |rest: &mut &str| -> Option<String> {
        let s = rest.trim_start();
        if s.is_empty() {
            return None;
        }
        let end = s.find(|c: char| c.is_ascii_whitespace()).unwrap_or(s.len());
        let w = s[..end].to_string();
        *rest = &s[end..];
        Some(w)
    };
    let sectors: i64 = next_word(&mut rest)
        .and_then(|w| w.parse().ok())
        .ok_or_else(bad)?;
    let kind = next_word(&mut rest).ok_or_else(bad)?;
    let s = rest.trim_start();
    let (file, rest) = if let Some(q) = s.strip_prefix('"') {
        let end = q.find('"').ok_or_else(bad)?;
        (Some(q[..end].to_string()), &q[end + 1..])
    } else {
        (None, s)
    };
    let rest = rest.trim();
    let offset = if rest.is_empty() {
        None
    } else {
        let first = rest.split_ascii_whitespace().next().unwrap_or("");
        Some(first.parse::<i64>().map_err(|_| bad())?)
    };
    if sectors <= 0 {
        return Err(bad());
    }
    match kind.as_str() {
        "FLAT" => {
            if file.is_none() || offset.is_none_or(|o| o < 0) {
                return Err(bad());
            }
        }
        "ZERO" => {}
        _ => {
            if file.is_none() || offset.is_some() {
                return Err(bad());
            }
        }
    }
    let offset = offset.unwrap_or(0) as u64;
    if offset.checked_mul(512).is_none() || (sectors as u64).checked_mul(512).is_none() {
        return Err(bad());
    }
    Ok(ExtentLine {
        access,
        sectors: sectors as u64,
        kind,
        file,
        offset,
    })
}

impl Descriptor {
    /// Parses descriptor text (bytes up to the first NUL; invalid UTF-8 is replaced).
    pub fn parse(bytes: &[u8]) -> Result<Descriptor> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let mut d = Descriptor {
            text: text.clone(),
            ..Descriptor::default()
        };
        for raw in text.lines() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(access) = looks_like_extent(line) {
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(Error::invalid_image(format!(
                        "descriptor lists more than {MAX_EXTENTS} extents"
                    )));
                }
                let e = parse_extent(line, access)?;
                d.extents.push(e);
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let k = k.trim();
            let v = unquote(v);
            match k {
                "CID" if d.cid.is_none() => d.cid = parse_hex(v),
                "parentCID" if d.parent_cid.is_none() => d.parent_cid = parse_hex(v),
                "createType" if d.create_type.is_none() => d.create_type = Some(v.to_string()),
                "parentFileNameHint" if d.parent_hint.is_none() => {
                    d.parent_hint = Some(v.to_string())
                }
                _ => {}
            }
        }
        Ok(d)
    }
}

fn parse_hex(v: &str) -> Option<u32> {
    let v = v.trim();
    let end = v.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(v.len());
    u32::from_str_radix(&v[..end], 16).ok()
}

/// The text with the value of the first `CID=` line replaced.
pub fn replace_cid(text: &str, cid: u32) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut done = false;
    for line in text.split_inclusive('\n') {
        if !done && line.trim_start().starts_with("CID=") {
            out.push_str(&format!("CID={cid:08x}\n"));
            done = true;
        } else {
            out.push_str(line);
        }
    }
    out
}

/// Does this text look like a descriptor? The same test QEMU applies: comment lines and
/// blank lines, then `version=1`, `2` or `3`.
pub fn probe_text(buf: &[u8]) -> bool {
    let mut p = 0;
    let n = buf.len();
    while p < n {
        match buf[p] {
            b'#' => {
                while p < n && buf[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < n && buf[p] == b' ' {
                    p += 1;
                }
                if p < n && buf[p] == b'\r' {
                    p += 1;
                }
                if p >= n || buf[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = &buf[p..];
                for v in [b'1', b'2', b'3'] {
                    let mut lf = b"version=X\n".to_vec();
                    lf[8] = v;
                    let mut crlf = b"version=X\r\n".to_vec();
                    crlf[8] = v;
                    if rest.starts_with(&lf) || rest.starts_with(&crlf) {
                        return true;
                    }
                }
                return false;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESC: &str = "# Disk DescriptorFile\nversion=1\nCID=58e83a34\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\nparentFileNameHint=\"base.vmdk\"\n\n# Extent description\nRW 4194304 FLAT \"f-f001.vmdk\" 0\nRDONLY 2048 ZERO\nRW 100 SPARSE \"with space.vmdk\"\n\nddb.adapterType = \"ide\"\n";

    #[test]
    fn parses() {
        let d = Descriptor::parse(DESC.as_bytes()).unwrap();
        assert_eq!(d.cid, Some(0x58e83a34));
        assert_eq!(d.parent_cid, Some(0xffffffff));
        assert_eq!(d.create_type.as_deref(), Some("twoGbMaxExtentFlat"));
        assert_eq!(d.parent_hint.as_deref(), Some("base.vmdk"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some("f-f001.vmdk"));
        assert_eq!(d.extents[1].kind, "ZERO");
        assert_eq!(d.extents[1].access, Access::RdOnly);
        assert_eq!(d.extents[2].file.as_deref(), Some("with space.vmdk"));
    }

    #[test]
    fn bad_lines() {
        assert!(Descriptor::parse(b"RW 10 FLAT \"x\"\n").is_err());
        assert!(Descriptor::parse(b"RW 10 SPARSE \"x\" 5\n").is_err());
        assert!(Descriptor::parse(b"RW 10 SPARSE \"x\n").is_err());
        assert!(Descriptor::parse(b"RW 99999999999999999999 FLAT \"x\" 0\n").is_err());
    }

    #[test]
    fn cid_rewrite_and_probe() {
        let t = replace_cid(DESC, 0xabc);
        assert!(t.contains("CID=00000abc\nparentCID=ffffffff\n"));
        assert!(probe_text(DESC.as_bytes()));
        assert!(probe_text(b"  \n# x\nversion=1\r\n"));
        assert!(!probe_text(b"hello"));
    }
}
