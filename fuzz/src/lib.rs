//! What the fuzz targets do, shared so that every target exercises a driver the same way.
//!
//! The image targets write the input to a file (under `$DISKIT_FUZZ_DIR`, else `/dev/shm`,
//! else the temp dir), open it read-only through the public API, and if it opens: `info()`,
//! `map()` over the whole virtual size (bounded), and `read_at` of a few ranges (never more
//! than 4 MiB in all). Errors are fine; panics, hangs, overflows and huge allocations are
//! the findings. A broken `map` contract (a length of 0 or past `max_len`) panics on purpose.

use std::path::PathBuf;
use std::sync::OnceLock;

use diskit::formats::options::{parse_size, parse_size_default, split_opts};
use diskit::formats::RepairMode;
use diskit::ops::check::{check, CheckOptions};
use diskit::{BlockDriver, CreateOpts, Format, Mapping, OpenOptions};

/// At most this many `map` calls per walk.
const MAX_MAP_CALLS: usize = 4096;
/// At most this many bytes read per input.
const MAX_READ_TOTAL: u64 = 4 << 20;
/// At most this many bytes per read.
const MAX_READ: u64 = 1 << 20;
/// How deep to walk `backing()` for `info()`.
const MAX_CHAIN_INFO: usize = 16;

/// The file each input is written to (one per process: parallel fuzz jobs do not collide).
/// Its name is `img` in a private directory, so a backing name of `img` is the image itself.
pub fn image_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let base = std::env::var_os("DISKIT_FUZZ_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let shm = PathBuf::from("/dev/shm");
                if shm.is_dir() {
                    shm
                } else {
                    std::env::temp_dir()
                }
            });
        let dir = base.join(format!("diskit-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the fuzz directory");
        dir.join("img")
    })
}

/// Writes `data` as an image, opens it (format forced, or probed when `None`) and reads it.
pub fn exercise_image(data: &[u8], format: Option<Format>) {
    let path = image_path();
    std::fs::write(path, data).expect("writing the fuzz input");
    let opts = OpenOptions::read_only().with_format(format);
    let Ok(img) = diskit::open(path.to_str().expect("utf-8 path"), &opts) else {
        return;
    };
    exercise_driver(img.as_ref());
}

/// `check` on arbitrary bytes as qcow2: the read-only pass, then `check -r all` on the same
/// file, then a read-only open of whatever the repair left (which must not panic either).
pub fn exercise_check(data: &[u8]) {
    let path = image_path();
    std::fs::write(path, data).expect("writing the fuzz input");
    let name = path.to_str().expect("utf-8 path");
    let ro = CheckOptions {
        format: Some(Format::Qcow2),
        ..CheckOptions::default()
    };
    if check(name, &ro).is_err() {
        return;
    }
    let rw = CheckOptions {
        repair: Some(RepairMode::All),
        ..ro.clone()
    };
    if check(name, &rw).is_err() {
        return;
    }
    let opts = OpenOptions::read_only().with_format(Some(Format::Qcow2));
    if let Ok(img) = diskit::open(name, &opts) {
        exercise_driver(img.as_ref());
    }
}

/// Names of the extent files [`exercise_vmdk_descriptor`] provides next to the descriptor.
pub const DESCRIPTOR_EXTENTS: [&str; 3] = ["ext-sparse.vmdk", "ext-flat.raw", "ext-vdi.vdi"];

/// The input is a VMDK descriptor file; next to it lie a 1 MiB monolithicSparse extent
/// (`ext-sparse.vmdk`), a 1 MiB flat extent (`ext-flat.raw`) and a file of another format
/// (`ext-vdi.vdi`), all made by diskit itself once per process.
pub fn exercise_vmdk_descriptor(data: &[u8]) {
    static EXTENTS: OnceLock<()> = OnceLock::new();
    let path = image_path();
    let dir = path.parent().expect("fuzz directory");
    EXTENTS.get_or_init(|| {
        let sized = CreateOpts::parse("size=1M").expect("size option");
        let sparse = dir.join(DESCRIPTOR_EXTENTS[0]);
        diskit::create(sparse.to_str().unwrap(), Format::Vmdk, &sized).expect("vmdk extent");
        let flat: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join(DESCRIPTOR_EXTENTS[1]), flat).expect("flat extent");
        let vdi = dir.join(DESCRIPTOR_EXTENTS[2]);
        diskit::create(vdi.to_str().unwrap(), Format::Vdi, &sized).expect("vdi file");
    });
    let desc = dir.join("desc.vmdk");
    std::fs::write(&desc, data).expect("writing the fuzz input");
    let opts = OpenOptions::read_only().with_format(Some(Format::Vmdk));
    let Ok(img) = diskit::open(desc.to_str().expect("utf-8 path"), &opts) else {
        return;
    };
    exercise_driver(img.as_ref());
}

/// Everything a read-only user does with an open image, bounded.
pub fn exercise_driver(img: &dyn BlockDriver) {
    let _ = img.format();
    let _ = img.filename();
    let _ = img.cluster_size();
    let vs = img.virtual_size();

    // info of the image and its backing chain, rendered as both tools print it
    let mut node: Option<&dyn BlockDriver> = Some(img);
    let mut infos = Vec::new();
    for _ in 0..MAX_CHAIN_INFO {
        let Some(n) = node else { break };
        if let Ok(info) = n.info() {
            let _ = diskit::qjson::to_pretty(&info.to_json());
            infos.push(info);
        }
        node = n.backing();
    }
    let _ = diskit::cli::human::info_text(&infos);

    // map over the whole guest, checking the trait's contract
    let mut data_at = Vec::new();
    let mut off = 0u64;
    for _ in 0..MAX_MAP_CALLS {
        if off >= vs {
            break;
        }
        let max_len = vs - off;
        let Ok((m, len)) = img.map(off, max_len) else {
            break;
        };
        assert!(
            len >= 1 && len <= max_len,
            "map({off}, {max_len}) returned length {len}"
        );
        if !matches!(m, Mapping::Unallocated | Mapping::Zero { .. }) && data_at.len() < 4 {
            data_at.push(off);
        }
        off += len;
    }
    // a few small maps at odd places
    for o in [vs / 3, vs.saturating_sub(1), 511] {
        if o < vs {
            if let Ok((_, len)) = img.map(o, 1) {
                assert_eq!(len, 1, "map({o}, 1) returned length {len}");
            }
        }
    }

    // reads: start, middle, end, an unaligned one, and where map found data
    let mut ranges = vec![
        (0, MAX_READ),
        (vs / 2, 64 << 10),
        (vs.saturating_sub(64 << 10), 64 << 10),
        (511, 1025),
    ];
    ranges.extend(data_at.iter().map(|&o| (o, 256 << 10)));
    let mut total = 0u64;
    for (o, len) in ranges {
        if o >= vs {
            continue;
        }
        let len = len.min(vs - o).min(MAX_READ).min(MAX_READ_TOTAL - total);
        if len == 0 {
            break;
        }
        total += len;
        let mut buf = vec![0u8; len as usize];
        let _ = img.read_at(&mut buf, o);
    }
}

/// `-o` strings and sizes: parsing must never panic, and must agree with plain arithmetic.
pub fn exercise_options(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let _ = split_opts(&s);
    let _ = parse_size(&s);
    let _ = parse_size_default(&s, 512);
    if let Ok(o) = CreateOpts::parse(&s) {
        let keys: Vec<String> = o.iter().map(|(k, _)| k.to_string()).collect();
        for k in &keys {
            let _ = o.get(k);
            let _ = o.get_bool(k);
            let _ = o.get_size(k);
            let _ = o.get_number(k);
        }
        let _ = o.wants_help();
        for &f in Format::supported() {
            let _ = diskit::formats::create_summary(f, &o);
            let _ = o.check_known(diskit::formats::create_options(f), "fuzz.img");
        }
    }
    // round trips on a number taken from the input
    if data.len() >= 8 {
        let n = u64::from_le_bytes(data[..8].try_into().unwrap());
        assert_eq!(parse_size(&n.to_string()), Ok(n), "parse_size({n})");
        assert_eq!(parse_size(&format!("{n:#x}")), Ok(n), "parse_size({n:#x})");
        for (suffix, shift) in [
            ("k", 10),
            ("M", 20),
            ("G", 30),
            ("T", 40),
            ("P", 50),
            ("E", 60),
        ] {
            let m = if data[0] & 1 == 0 { n >> shift } else { n };
            let got = parse_size(&format!("{m}{suffix}"));
            match m.checked_mul(1u64 << shift) {
                Some(v) => assert_eq!(got, Ok(v), "parse_size({m}{suffix})"),
                None => assert!(got.is_err(), "parse_size({m}{suffix}) = {got:?}"),
            }
        }
    }
}
