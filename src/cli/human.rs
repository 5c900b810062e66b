//! Human-readable output in qemu-img's words.

use crate::formats::{ImageInfo, SnapshotInfo};
use crate::qjson::{Json, Obj};

/// `%0.3g` of a value below 1000 (enough for qemu's size_to_str).
fn g3(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let sci = format!("{v:.2e}");
    let exp: i32 = sci
        .split('e')
        .nth(1)
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    if !(-4..3).contains(&exp) {
        // qemu never gets here for sizes; keep C's style anyway
        let (m, _) = sci.split_once('e').unwrap_or((&sci, "0"));
        let m = m.trim_end_matches('0').trim_end_matches('.');
        return format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// qemu's `size_to_str`: `1.25 MiB`, `512 B`, `1 GiB`.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = val as f64 / (1000.0 / 1024.0);
    // frexp exponent: scaled = m * 2^e with m in [0.5, 1)
    let e = if scaled == 0.0 {
        0
    } else {
        scaled.log2().floor() as i32 + 1
    };
    let i = ((e - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", g3(val as f64 / div), SUFFIXES[i])
}

fn dump_value(out: &mut String, indent: usize, v: &Json) {
    match v {
        Json::Obj(o) => dump_obj(out, indent, o),
        Json::Arr(items) => {
            for (i, item) in items.iter().enumerate() {
                let composite = matches!(item, Json::Obj(_) | Json::Arr(_));
                out.push_str(&format!(
                    "{:w$}[{i}]:{}",
                    "",
                    if composite { '\n' } else { ' ' },
                    w = indent * 4
                ));
                dump_value(out, indent + 1, item);
                if !composite {
                    out.push('\n');
                }
            }
        }
        Json::Str(s) => out.push_str(s),
        other => out.push_str(&crate::qjson::to_compact(other)),
    }
}

fn dump_obj(out: &mut String, indent: usize, o: &Obj) {
    for (k, v) in o.qemu_order() {
        let composite = matches!(v, Json::Obj(_) | Json::Arr(_));
        out.push_str(&format!(
            "{:w$}{}:{}",
            "",
            k.replace('-', " "),
            if composite { '\n' } else { ' ' },
            w = indent * 4
        ));
        dump_value(out, indent + 1, v);
        if !composite {
            out.push('\n');
        }
    }
}

fn local_date(sec: u64) -> String {
    // SAFETY: localtime_r with valid pointers.
    let t = sec as libc::time_t;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&t, &mut tm) };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The header line of a snapshot table.
pub fn snapshot_header() -> String {
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )
}

/// One line of a snapshot table.
pub fn snapshot_line(sn: &SnapshotInfo) -> String {
    let secs = sn.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (sn.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = sn
        .icount
        .map(|i| i.to_string())
        .unwrap_or_else(|| "--".to_string());
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        sn.id,
        sn.name,
        size_to_str(sn.vm_state_size),
        local_date(sn.date_sec),
        clock,
        icount
    )
}

/// One node the way `bdrv_node_info_dump` prints it.
fn node_dump(out: &mut String, info: &ImageInfo, indent: usize, protocol: bool) {
    let ind = " ".repeat(indent * 4);
    let protocol = protocol && indent > 0;
    let dsize = info
        .actual_size
        .map(size_to_str)
        .unwrap_or_else(|| "unavailable".to_string());
    out.push_str(&format!(
        "{ind}{}: {}\n{ind}{}: {}\n{ind}{}: {} ({} bytes)\n{ind}disk size: {dsize}\n",
        if protocol { "filename" } else { "image" },
        info.filename,
        if protocol {
            "protocol type"
        } else {
            "file format"
        },
        info.format,
        if protocol {
            "file length"
        } else {
            "virtual size"
        },
        size_to_str(info.virtual_size),
        info.virtual_size
    ));
    if info.encrypted == Some(true) {
        out.push_str(&format!("{ind}encrypted: yes\n"));
    }
    if let Some(cs) = info.cluster_size {
        out.push_str(&format!("{ind}cluster_size: {cs}\n"));
    }
    if info.dirty_flag {
        out.push_str(&format!("{ind}cleanly shut down: no\n"));
    }
    if let Some(b) = &info.backing_filename {
        out.push_str(&format!("{ind}backing file: {b}"));
        match &info.full_backing_filename {
            None => out.push_str(" (cannot determine actual path)"),
            Some(full) if full != b => out.push_str(&format!(" (actual path: {full})")),
            _ => {}
        }
        out.push('\n');
        if let Some(f) = &info.backing_filename_format {
            out.push_str(&format!("{ind}backing file format: {f}\n"));
        }
    }
    if !info.snapshots.is_empty() {
        out.push_str(&format!(
            "{ind}Snapshot list:\n{ind}{}\n",
            snapshot_header()
        ));
        for sn in &info.snapshots {
            out.push_str(&format!("{ind}{}\n", snapshot_line(sn)));
        }
    }
    if let Some((_, data)) = &info.format_specific {
        if !data.0.is_empty() {
            out.push_str(&format!("{ind}Format specific information:\n"));
            dump_obj(out, indent + 1, data);
        }
    }
}

fn graph_dump(out: &mut String, info: &ImageInfo, indent: usize, path: &str) {
    node_dump(out, info, indent, info.children.is_empty());
    for (name, child) in &info.children {
        out.push_str(&format!(
            "{:w$}Child node '{path}{name}':\n",
            "",
            w = indent * 4
        ));
        graph_dump(out, child, indent + 1, &format!("{path}{name}/"));
    }
}

/// `qemu-img info` human output for a list of images (a chain), blank lines between.
pub fn info_text(list: &[ImageInfo]) -> String {
    let mut out = String::new();
    for (i, info) in list.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        graph_dump(&mut out, info, 0, "/");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(1314816), "1.25 MiB");
        assert_eq!(size_to_str(1376256), "1.31 MiB");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
    }
}
