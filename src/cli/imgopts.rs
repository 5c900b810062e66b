//! `--image-opts` / `--target-image-opts` image specifications such as
//! `driver=qcow2,file.driver=file,file.filename=disk.qcow2`, read the way qemu-img reads them
//! (QemuOpts syntax: `,,` is a literal comma, a first word without `=` is the implied `file`
//! option, later keys override earlier ones), with qemu-img's messages for what diskit cannot
//! or will not open.

use super::CliError;
use crate::formats::Format;

/// What a specification names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The image format; `None` probes.
    pub format: Option<Format>,
    /// The host file.
    pub filename: String,
    /// `force-share=on`.
    pub force_share: bool,
}

/// Options every block node takes (accepted; their effect is diskit's default or harmless
/// for a copy).
const NODE_OPTS: &[&str] = &[
    "node-name",
    "read-only",
    "auto-read-only",
    "force-share",
    "cache.direct",
    "cache.no-flush",
    "discard",
    "detect-zeroes",
];

/// Runtime options of the qcow2 driver that tune QEMU's caches, discards and overlap checks;
/// accepted (diskit has no such knobs, and reads and writes the same without them).
const QCOW2_OPTS: &[&str] = &[
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "overlap-check",
];

/// Extra options of the `file` protocol driver that diskit accepts.
const FILE_OPTS: &[&str] = &["filename", "locking", "aio", "aio-max-batch", "drop-cache"];

/// The key/value pairs of a QemuOpts string (`implied` names a leading bare word).
fn split_qemu_opts(spec: &str, implied: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let b = spec.as_bytes();
    let mut i = 0;
    let mut first = true;
    // reads up to an unescaped `,` (`,,` is a comma); returns (text, next index)
    let value = |mut j: usize| -> (String, usize) {
        let mut v = Vec::new();
        while j < b.len() {
            if b[j] == b',' {
                if b.get(j + 1) == Some(&b',') {
                    v.push(b',');
                    j += 2;
                    continue;
                }
                break;
            }
            v.push(b[j]);
            j += 1;
        }
        (String::from_utf8_lossy(&v).into_owned(), j)
    };
    while i < b.len() {
        // a name ends at `=` or `,`
        let start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let name = String::from_utf8_lossy(&b[start..i]).into_owned();
        if i < b.len() && b[i] == b'=' {
            let (v, j) = value(i + 1);
            out.push((name, v));
            i = j;
        } else if first && !implied.is_empty() {
            // a bare first word is the implied option, commas escaped as in a value
            let (v, j) = value(start);
            out.push((implied.to_string(), v));
            i = j;
        } else if !name.is_empty() {
            // a bare flag: `name` is `name=on`, `noname` is `name=off`
            match name.strip_prefix("no") {
                Some(n) if !n.is_empty() => out.push((n.to_string(), "off".into())),
                _ => out.push((name, "on".into())),
            }
        }
        first = false;
        if i < b.len() {
            i += 1; // the separating comma
        }
    }
    out
}

/// Parses an image specification; `force_share` is `-U`. Errors carry qemu-img's text,
/// `Could not open 'SPEC': ...` included.
pub fn parse(spec: &str, force_share: bool) -> Result<ImageSpec, CliError> {
    let fail = |m: String| CliError::Msg(format!("Could not open '{spec}': {m}"));
    let pairs = split_qemu_opts(spec, "file");
    // later keys override earlier ones
    let mut opts: Vec<(String, String)> = Vec::new();
    for (k, v) in pairs {
        if let Some(slot) = opts.iter_mut().find(|(ok, _)| *ok == k) {
            slot.1 = v;
        } else {
            opts.push((k, v));
        }
    }
    let get = |k: &str| opts.iter().find(|(ok, _)| ok == k).map(|(_, v)| v.as_str());
    if let Some(fs) = get("force-share") {
        if force_share && fs != "on" {
            return Err(CliError::Msg(
                "--force-share/-U conflicts with image options".into(),
            ));
        }
    }
    let spec_share = force_share || get("force-share") == Some("on");
    if let Some(node) = get("file") {
        // a reference to another block node: diskit has none
        return Err(fail(format!(
            "Cannot find device='{node}' nor node-name='{node}'"
        )));
    }
    let has_file_opts = opts.iter().any(|(k, _)| k.starts_with("file."));
    let driver = match get("driver") {
        Some(d) => Some(d),
        None if has_file_opts => None,
        None => return Err(fail("Must specify either driver or file".into())),
    };
    let file_name = |filename: Option<&str>| -> Result<String, CliError> {
        match filename {
            Some(f) if !f.is_empty() => Ok(f.to_string()),
            _ => Err(fail("The 'file' block driver requires a file name".into())),
        }
    };
    if driver == Some("file") {
        // the protocol alone: the file's bytes, as raw
        let filename = file_name(get("filename"))?;
        if let Some((k, _)) = opts.iter().find(|(k, _)| {
            k != "driver" && !NODE_OPTS.contains(&k.as_str()) && !FILE_OPTS.contains(&k.as_str())
        }) {
            return Err(fail(format!(
                "Block protocol 'file' doesn't support the option '{k}'"
            )));
        }
        return Ok(ImageSpec {
            format: Some(Format::Raw),
            filename,
            force_share: spec_share,
        });
    }
    let format = match driver {
        None => None,
        Some(d) => match Format::from_name(d) {
            Ok(f) => Some(f),
            Err(_) => return Err(fail(format!("Unknown driver '{d}'"))),
        },
    };
    // named in messages as qemu-img names the probed format when none is given
    let driver = driver.unwrap_or("raw");
    match get("file.driver") {
        None | Some("file") => {}
        Some(d) if Format::from_name(d).is_ok() => {
            // a format as the protocol layer would need its own `file` child
            return Err(fail("A block device must be specified for \"file\"".into()));
        }
        Some(d) => return Err(fail(format!("Unknown driver '{d}'"))),
    }
    if !has_file_opts {
        return Err(fail("A block device must be specified for \"file\"".into()));
    }
    let filename = file_name(get("file.filename"))?;
    for (k, _) in &opts {
        if let Some(sub) = k.strip_prefix("file.") {
            if sub != "driver" && !NODE_OPTS.contains(&sub) && !FILE_OPTS.contains(&sub) {
                return Err(fail(format!(
                    "Block protocol 'file' doesn't support the option '{sub}'"
                )));
            }
        } else if k != "driver"
            && !NODE_OPTS.contains(&k.as_str())
            && !(format == Some(Format::Qcow2)
                && (QCOW2_OPTS.contains(&k.as_str()) || k.starts_with("overlap-check.")))
        {
            return Err(fail(format!(
                "Block format '{driver}' does not support the option '{k}'"
            )));
        }
    }
    Ok(ImageSpec {
        format,
        filename,
        force_share: spec_share,
    })
}

/// Rewrites an open error about `filename` as qemu-img words it for `spec`
/// (`Could not open 'SPEC': ...` instead of `Could not open 'FILE': ...`).
pub fn reword(msg: &str, filename: &str, spec: &str) -> Option<String> {
    msg.strip_prefix(&format!("Could not open '{filename}': "))
        .map(|rest| format!("Could not open '{spec}': {rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_opts_syntax() {
        assert_eq!(
            split_qemu_opts("a,,b,driver=x,,y,ro,noz,,", "file"),
            vec![
                ("file".to_string(), "a,b".to_string()),
                ("driver".into(), "x,y".into()),
                ("ro".into(), "on".into()),
                ("z".into(), "off".into()),
            ]
        );
        let s = parse("driver=qcow2,file.driver=file,file.filename=a,,b", false).unwrap();
        assert_eq!(s.format, Some(Format::Qcow2));
        assert_eq!(s.filename, "a,b");
        let s = parse("file.filename=x", false).unwrap();
        assert_eq!(s.format, None);
        let s = parse("driver=file,filename=x", false).unwrap();
        assert_eq!(s.format, Some(Format::Raw));
        assert!(parse("driver=raw,file.filename=x,offset=1", false).is_err());
        assert!(parse("driver=qcow2", false).is_err());
        assert!(parse("x", false).is_err());
    }
}
