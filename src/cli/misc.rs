//! The verbs `bitmap` and `bench`, parsed the way qemu-img's getopt does.

use std::io::Write;

use super::qverbs::{getopt, l, o};
use super::verbs::{cvtnum, cvtnum_full, open_format};
use super::{CliError, VerbResult};
use crate::formats::Format;
use crate::ops;
use crate::ops::bitmap::BitmapOp;

/// `--image-opts`: the driver and file name of an option string such as
/// `driver=qcow2,file.filename=disk.qcow2`.
fn image_opts(spec: &str) -> Result<(Option<String>, String), CliError> {
    let mut driver = None;
    let mut file = None;
    for part in spec.split(',') {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        match k {
            "driver" => driver = Some(v.to_string()),
            "file.filename" | "filename" | "file" => file = Some(v.to_string()),
            _ => {}
        }
    }
    match file {
        Some(f) => Ok((driver, f)),
        None => Err(CliError::Msg(format!(
            "Could not open '{spec}': A block device must be specified for \"file\""
        ))),
    }
}

/// `bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
/// [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJDEF] [--image-opts | -f FMT]
/// FILENAME BITMAP`
pub fn bitmap(argv: &[String]) -> VerbResult {
    let spec = [
        o('h', "help", false, "h"),
        l("object", true, "object"),
        l("image-opts", false, "image-opts"),
        l("add", false, "add"),
        l("remove", false, "remove"),
        l("clear", false, "clear"),
        l("enable", false, "enable"),
        l("disable", false, "disable"),
        l("merge", true, "merge"),
        o('g', "granularity", true, "g"),
        o('b', "source-file", true, "b"),
        o('F', "source-format", true, "F"),
        o('f', "", true, "f"),
    ];
    let (opts, files) = getopt("bitmap", argv, &spec)?;
    let mut ops_list = Vec::new();
    let mut fmt = None;
    let mut src_fmt = None;
    let mut src_file = None;
    let mut granularity = 0;
    let mut use_image_opts = false;
    for (k, v) in opts {
        match k {
            "h" => {
                println!(
                    "Usage: {} bitmap (--merge SOURCE | --add | --remove | --clear |\n        --enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]]\n        [-g GRANULARITY] [--object OBJDEF] [--image-opts | -f FMT] FILENAME BITMAP",
                    super::prog()
                );
                return Ok(0);
            }
            "b" => src_file = Some(v),
            "f" => fmt = Some(v),
            "F" => src_fmt = Some(v),
            "g" => granularity = cvtnum("granularity", &v)?,
            "add" => ops_list.push(BitmapOp::Add),
            "remove" => ops_list.push(BitmapOp::Remove),
            "clear" => ops_list.push(BitmapOp::Clear),
            "enable" => ops_list.push(BitmapOp::Enable),
            "disable" => ops_list.push(BitmapOp::Disable),
            "merge" => ops_list.push(BitmapOp::Merge(v)),
            "image-opts" => use_image_opts = true,
            _ => {}
        }
    }
    if ops_list.is_empty() {
        return Err(CliError::Msg(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge".into(),
        ));
    }
    if granularity != 0 && !ops_list.contains(&BitmapOp::Add) {
        return Err(CliError::Msg(
            "granularity only supported with --add".into(),
        ));
    }
    if src_fmt.is_some() && src_file.is_none() {
        return Err(CliError::Msg("-F only supported with -b".into()));
    }
    if src_file.is_some() && !ops_list.iter().any(|o| matches!(o, BitmapOp::Merge(_))) {
        return Err(CliError::Msg(
            "Merge bitmap source file only supported with --merge".into(),
        ));
    }
    if files.len() != 2 {
        return Err(CliError::Msg("Expecting filename and bitmap name".into()));
    }
    let (mut file, name) = (files[0].clone(), files[1].clone());
    if use_image_opts {
        let (d, f) = image_opts(&file)?;
        file = f;
        fmt = d;
    }
    let format = open_format(&fmt, &file)?;
    let source_format = match (&src_file, &src_fmt) {
        (Some(sf), Some(_)) => open_format(&src_fmt, sf)?,
        _ => None,
    };
    let o = ops::bitmap::BitmapOptions {
        format,
        granularity,
        source_file: src_file,
        source_format,
    };
    if let Err(e) = ops::bitmap::bitmap(&file, &name, &ops_list, &o) {
        let m = e.message();
        if m.starts_with("Lost persistent bitmaps") {
            // qemu reports the failed store at inactivation and again at close
            let p = super::prog();
            eprintln!("{p}: {m}");
            eprintln!("{p}: Error while closing the image: Invalid argument");
            eprintln!("{p}: {m}");
            return Err(CliError::Exit(1));
        }
        return Err(e.into());
    }
    Ok(0)
}

/// A number as C's strtoul with base 0 reads it (leading blanks, a sign, 0x hex, 0 octal);
/// `None` where the text is not a number, `Some(None)` where it is out of range.
fn c_number(s: &str) -> Option<Option<u64>> {
    let t = s.trim_start();
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    match u64::from_str_radix(digits, radix) {
        Ok(0) => Some(Some(0)),
        Ok(v) if !neg => Some(Some(v)),
        _ => Some(None),
    }
}

fn int_arg(what: &str, s: &str, min: u64, max: u64) -> Result<u64, CliError> {
    match c_number(s) {
        None => Err(CliError::Msg(format!("Invalid {what} specified: '{s}'."))),
        Some(Some(v)) if (min..=max).contains(&v) => Ok(v),
        Some(_) => Err(CliError::Msg(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        ))),
    }
}

const INT_MAX: u64 = i32::MAX as u64;

/// `bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=FLUSH_INTERVAL] [-i AIO] [-n]
/// [--no-drain] [-o OFFSET] [--pattern=PATTERN] [-q] [-s BUFFER_SIZE] [-S STEP_SIZE]
/// [-t CACHE] [-w] [-U] FILENAME`
pub fn bench(argv: &[String]) -> VerbResult {
    let spec = [
        o('h', "help", false, "h"),
        l("flush-interval", true, "flush-interval"),
        l("image-opts", false, "image-opts"),
        l("pattern", true, "pattern"),
        l("no-drain", false, "no-drain"),
        o('U', "force-share", false, "U"),
        o('c', "", true, "c"),
        o('d', "", true, "d"),
        o('f', "", true, "f"),
        o('n', "", false, "n"),
        o('i', "", true, "i"),
        o('o', "", true, "o"),
        o('q', "", false, "q"),
        o('s', "", true, "s"),
        o('S', "", true, "S"),
        o('t', "", true, "t"),
        o('w', "", false, "w"),
    ];
    let (opts, files) = getopt("bench", argv, &spec)?;
    let mut b = ops::bench::BenchOptions::default();
    let mut fmt = None;
    let mut native = false;
    let mut use_image_opts = false;
    for (k, v) in opts {
        match k {
            "h" => {
                println!(
                    "Usage: {} bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=FLUSH_INTERVAL] [-i AIO] [-n] [--no-drain] [-o OFFSET] [--pattern=PATTERN] [-q] [-s BUFFER_SIZE] [-S STEP_SIZE] [-t CACHE] [-w] [-U] FILENAME",
                    super::prog()
                );
                return Ok(0);
            }
            "c" => b.count = int_arg("request count", &v, 1, INT_MAX)?,
            "d" => b.depth = int_arg("queue depth", &v, 1, INT_MAX)?,
            "f" => fmt = Some(v),
            "n" => native = true,
            "i" => match v.as_str() {
                "native" => native = true,
                "threads" | "io_uring" => native = false,
                _ => return Err(CliError::Msg(format!("Invalid aio option: {v}"))),
            },
            "o" => b.offset = cvtnum("offset", &v)?,
            "s" => b.buf_size = cvtnum_full("buffer size", &v, 1, INT_MAX)?,
            "S" => b.step = cvtnum_full("step size", &v, 0, INT_MAX)?,
            "t" => {
                let (direct, wt) = match v.as_str() {
                    "none" | "off" => (true, false),
                    "writeback" => (false, false),
                    "unsafe" => (false, false),
                    "writethrough" => (false, true),
                    "directsync" => (true, true),
                    _ => return Err(CliError::Msg("Invalid cache mode".into())),
                };
                b.direct = direct;
                b.writethrough = wt;
            }
            "w" => b.write = true,
            "U" => b.force_share = true,
            "pattern" => b.pattern = int_arg("pattern byte", &v, 0, 255)? as u8,
            "flush-interval" => b.flush_interval = int_arg("flush interval", &v, 0, INT_MAX)?,
            "no-drain" => b.drain = false,
            "image-opts" => use_image_opts = true,
            _ => {}
        }
    }
    if files.len() != 1 {
        return Err(CliError::Usage(
            "Expecting one image file name".into(),
            "bench",
        ));
    }
    let mut file = files[0].clone();
    if !b.write && b.flush_interval != 0 {
        return Err(CliError::Msg(
            "--flush-interval is only available in write tests".into(),
        ));
    }
    if b.flush_interval != 0 && b.flush_interval < b.depth {
        return Err(CliError::Msg(
            "Flush interval can't be smaller than depth".into(),
        ));
    }
    if use_image_opts {
        let (d, f) = image_opts(&file)?;
        file = f;
        fmt = d;
    }
    let format: Option<Format> = open_format(&fmt, &file)?;
    if native && !b.direct {
        return Err(CliError::Msg(format!(
            "Could not open '{file}': aio=native was specified, but it requires cache.direct=on, which was not specified."
        )));
    }
    b.format = format;
    let bench = ops::bench::Bench::open(&file, &b)?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        b.count,
        if b.write { "write" } else { "read" },
        b.buf_size,
        b.depth,
        b.offset,
        bench.step()
    );
    if b.flush_interval != 0 {
        let _ = writeln!(out, "Sending flush every {} requests", b.flush_interval);
    }
    let _ = out.flush();
    let t = match bench.run() {
        Ok(t) => t,
        Err(e) => {
            let why = e
                .io_error()
                .map(crate::error::os_error_text)
                .unwrap_or_else(|| "Input/output error".to_string());
            return Err(CliError::Msg(format!("Failed request: {why}")));
        }
    };
    bench.close()?;
    let _ = writeln!(out, "Run completed in {:.3} seconds.", t.as_secs_f64());
    Ok(0)
}
