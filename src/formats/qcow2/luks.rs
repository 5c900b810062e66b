//! The LUKS (version 1) header of an encrypted qcow2 image, read for `info`: diskit does not
//! decrypt, but it shows what qemu-img shows of the encryption (algorithms, key slots).
//!
//! The header is LUKS's on-disk format (big-endian): a magic, version 1, the cipher name,
//! mode and hash as NUL-padded strings, the payload offset and key size, the master key
//! digest, its salt and iterations, the UUID, then eight key slots.

use super::header::be32;
use crate::error::{Error, Result};
use crate::io::HostFile;
use crate::qjson::{Json, Obj};

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// The fixed part of the header, key slots included.
const HEADER_LEN: usize = 592;
const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOTS: usize = 8;
const SECTOR: u64 = 512;

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// QEMU's name of a LUKS cipher with its key size ("aes" and 32 bytes: "aes-256").
fn cipher_alg(name: &str, key_bytes: u32) -> Result<String> {
    let bits = key_bytes * 8;
    match (name, key_bytes) {
        ("aes" | "serpent" | "twofish", 16 | 24 | 32) => Ok(format!("{name}-{bits}")),
        ("cast5", 16) => Ok("cast5-128".into()),
        ("sm4", 16) => Ok("sm4".into()),
        _ => Err(Error::invalid_image(format!(
            "Algorithm '{name}' with key size {key_bytes} bytes not supported"
        ))),
    }
}

/// The `encrypt` member of qcow2's format-specific info for a LUKS header at
/// `(offset, length)` of the image file.
pub(crate) fn info(file: &HostFile, (offset, length): (u64, u64)) -> Result<Obj> {
    if length < HEADER_LEN as u64 {
        return Err(Error::invalid_image(format!(
            "LUKS header of {length} bytes is too short"
        )));
    }
    let mut b = vec![0u8; HEADER_LEN];
    file.read_exact_at(&mut b, offset)?;
    if &b[0..6] != MAGIC {
        return Err(Error::invalid_image(
            "Volume is not in LUKS format".to_string(),
        ));
    }
    let version = u16::from_be_bytes([b[6], b[7]]);
    if version != 1 {
        return Err(Error::invalid_image(format!(
            "LUKS version {version} is not supported"
        )));
    }
    let cipher_name = text(&b[8..40]);
    let cipher_mode = text(&b[40..72]);
    let hash_spec = text(&b[72..104]);
    let payload_offset = be32(&b, 104) as u64 * SECTOR;
    let key_bytes = be32(&b, 108);
    let mk_iters = be32(&b, 164);
    let uuid = text(&b[168..208]);

    // "<mode>-<ivgen>[:<ivhash>]", e.g. "xts-plain64", "cbc-essiv:sha256"
    let (mode, ivgen) = cipher_mode.split_once('-').ok_or_else(|| {
        Error::invalid_image(format!(
            "Unexpected cipher mode string format '{cipher_mode}'"
        ))
    })?;
    let (ivgen, ivhash) = match ivgen.split_once(':') {
        Some((g, h)) => (g, Some(h)),
        None => (ivgen, None),
    };
    let effective_key = if mode == "xts" {
        key_bytes / 2
    } else {
        key_bytes
    };
    let alg = cipher_alg(&cipher_name, effective_key)?;

    let mut o = Obj::new()
        .with("format", "luks")
        .with("cipher-alg", alg)
        .with("cipher-mode", mode)
        .with("ivgen-alg", ivgen);
    if ivgen == "essiv" {
        if let Some(h) = ivhash {
            o.push("ivgen-hash-alg", h);
        }
    }
    o.push("hash-alg", hash_spec.as_str());
    o.push("detached-header", false);
    o.push("payload-offset", payload_offset);
    o.push("master-key-iters", mk_iters as u64);
    o.push("uuid", uuid.as_str());
    let slots: Vec<Json> = (0..SLOTS)
        .map(|i| {
            let s = 208 + i * 48;
            let active = be32(&b, s) == SLOT_ENABLED;
            let mut slot = Obj::new().with("active", active);
            if active {
                slot.push("iters", be32(&b, s + 4) as u64);
                slot.push("stripes", be32(&b, s + 44) as u64);
            }
            slot.push("key-offset", be32(&b, s + 40) as u64 * SECTOR);
            Json::Obj(slot)
        })
        .collect();
    o.push("slots", slots);
    Ok(o)
}
