//! The verbs: argument checks, calls into `ops`, output.

use std::io::Write;

use super::args::{
    self, CheckArgs, CompareArgs, ConvertArgs, CreateArgs, DdArgs, InfoArgs, MapArgs, MeasureArgs,
    ResizeArgs,
};
use super::imgopts;
use super::progress::Progress;
use super::{human, prog, CliError, VerbResult};
use crate::formats::options::{parse_size, split_opts, SizeError};
use crate::formats::{self, CreateOpts, Format};
use crate::ops;
use crate::qjson::{self, Json};

const VERBS: &[&str] = &[
    "amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create", "dd", "info",
    "map", "measure", "snapshot", "rebase", "resize", "compact",
];

/// Runs the verb named by `args[0]`.
pub fn dispatch(args: &[String]) -> VerbResult {
    let Some(verb) = args.first() else {
        return Err(CliError::Usage("Not enough arguments".into(), ""));
    };
    let rest = &args[1..];
    match verb.as_str() {
        "info" => info(rest),
        "create" => create(rest),
        "convert" => convert(rest),
        "map" => map(rest),
        "compact" => compact(rest),
        "measure" => measure(rest),
        "check" => check(rest),
        "dd" => dd(rest),
        "resize" => resize(rest),
        "compare" => compare(rest),
        "snapshot" => super::qverbs::snapshot(rest),
        "amend" => super::qverbs::amend(rest),
        "commit" => super::chain::commit(rest),
        "rebase" => super::chain::rebase(rest),
        "bitmap" => super::misc::bitmap(rest),
        "bench" => super::misc::bench(rest),
        "-h" | "--help" | "help" => {
            print_help();
            Ok(0)
        }
        "-V" | "--version" => {
            println!(
                "{} version {} (diskit)\nA drop-in equivalent of qemu-img, MIT OR Apache-2.0",
                prog(),
                env!("CARGO_PKG_VERSION")
            );
            Ok(0)
        }
        v if VERBS.contains(&v) => Err(CliError::Msg(format!(
            "Command not yet implemented in diskit: {v}"
        ))),
        v => Err(CliError::Usage(format!("Command not found: {v}"), "")),
    }
}

fn print_help() {
    let p = prog();
    println!(
        "{p}: disk image utility (diskit {})\n",
        env!("CARGO_PKG_VERSION")
    );
    println!("Usage: {p} [standard options] command [command options]\n");
    println!("Commands: {}", VERBS.join(", "));
    println!("\nSupported formats: raw qcow2 vmdk vdi");
    println!("\nRun '{p} COMMAND --help' for the options of a command.");
}

fn parse_format(name: &str) -> Result<Format, CliError> {
    Format::from_name(name).map_err(|_| CliError::Msg(format!("Unknown file format '{name}'")))
}

/// A `-f` for an image to open: qemu words an unknown one as an open failure.
pub(super) fn open_format(name: &Option<String>, file: &str) -> Result<Option<Format>, CliError> {
    match name.as_deref() {
        None => Ok(None),
        Some(n) => Format::from_name(n)
            .map(Some)
            .map_err(|_| CliError::Msg(format!("Could not open '{file}': Unknown driver '{n}'"))),
    }
}

/// `--image-opts`: each image specification in `files` becomes the file it names and
/// `format` the format it names (probed when none), `force_share` takes its `force-share`.
/// Returns the (file, specification) pairs, to word open errors as qemu-img does.
pub(super) fn image_specs(
    on: bool,
    format: &mut Option<String>,
    force_share: &mut bool,
    files: &mut [String],
) -> Result<Vec<(String, String)>, CliError> {
    let mut specs = Vec::new();
    if !on {
        return Ok(specs);
    }
    if format.is_some() {
        return Err(CliError::Msg(
            "--image-opts and --format are mutually exclusive".into(),
        ));
    }
    let share = *force_share;
    for f in files.iter_mut() {
        let sp = imgopts::parse(f, share)?;
        *force_share |= sp.force_share;
        *format = sp.format.map(|x| x.name().to_string());
        let spec = std::mem::replace(f, sp.filename.clone());
        specs.push((sp.filename, spec));
    }
    Ok(specs)
}

/// [`image_specs`] for a verb with the common `-f`/`-U` options.
fn common_specs(
    on: bool,
    common: &mut args::Common,
    files: &mut [String],
) -> Result<Vec<(String, String)>, CliError> {
    image_specs(on, &mut common.format, &mut common.force_share, files)
}

/// An open error message about a file given by specification, as qemu-img words it (`None`
/// when it is not about such a file).
fn reworded(specs: &[(String, String)], m: &str) -> Option<String> {
    specs
        .iter()
        .find_map(|(file, spec)| imgopts::reword(m, file, spec))
}

/// Words an open error about a file given by specification as qemu-img does.
fn reword_specs(specs: &[(String, String)], r: VerbResult) -> VerbResult {
    let re = |m: &str| reworded(specs, m);
    r.map_err(|e| match e {
        CliError::Lib(e) => match re(e.message()) {
            Some(m) => CliError::Lib(e.with_message(m)),
            None => CliError::Lib(e),
        },
        CliError::Msg(m) => CliError::Msg(re(&m).unwrap_or(m)),
        other => other,
    })
}

fn parse_output(output: &Option<String>, verb: &'static str) -> Result<bool, CliError> {
    match output.as_deref() {
        None | Some("human") => Ok(false),
        Some("json") => Ok(true),
        Some(o) => Err(CliError::Usage(
            format!("--output expects 'human' or 'json' not '{o}'"),
            verb,
        )),
    }
}

fn info(argv: &[String]) -> VerbResult {
    let mut a: InfoArgs = args::parse("info", argv)?;
    let specs = common_specs(a.image_opts, &mut a.common, &mut a.files)?;
    reword_specs(&specs, info_with(a))
}

fn info_with(a: InfoArgs) -> VerbResult {
    if a.files.len() != 1 {
        return Err(CliError::Usage(
            "Expecting one image file name".into(),
            "info",
        ));
    }
    let json = parse_output(&a.common.output, "info")?;
    let format = open_format(&a.common.format, &a.files[0])?;
    let opts = ops::info::InfoOptions {
        format,
        backing_chain: a.backing_chain,
        force_share: a.common.force_share,
    };
    let list = ops::info::info(&a.files[0], &opts)?;
    let mut out = std::io::stdout().lock();
    if json {
        let v = if a.backing_chain {
            Json::Arr(list.iter().map(|i| i.to_json()).collect())
        } else {
            list[0].to_json()
        };
        let _ = writeln!(out, "{}", qjson::to_pretty(&v));
    } else {
        let _ = write!(out, "{}", human::info_text(&list));
    }
    Ok(0)
}

/// `-o` strings merged, checking for help requests.
fn merge_opts(list: &[String]) -> Result<CreateOpts, CliError> {
    let mut o = CreateOpts::new();
    for s in list {
        o.merge(s).map_err(CliError::Lib)?;
    }
    Ok(o)
}

/// `-o help`: the format's options; with a target file name, merged with the host file's
/// options (sorted by name), as qemu-img prints them.
fn print_opts_help(format: Format, filename: Option<&str>) {
    if filename.is_some() {
        let mut all: Vec<&formats::OptDesc> = formats::create_options(format).iter().collect();
        for d in formats::raw::PROTOCOL_OPTS {
            if !all.iter().any(|x| x.name == d.name) {
                all.push(d);
            }
        }
        all.sort_by_key(|d| d.name);
        println!("Supported options:");
        for d in all {
            println!("{}", d.help_line());
        }
        return;
    }
    println!("Supported {} options:", format.name());
    for d in formats::create_options(format) {
        println!("{}", d.help_line());
    }
    println!("\nThe protocol level may support further options.\nSpecify the target filename to include those options.");
}

fn wants_help(list: &[String]) -> bool {
    list.iter()
        .flat_map(|s| split_opts(s))
        .any(|k| k == "help" || k == "?")
}

/// qemu-img's `cvtnum`: a size argument, with its two error messages.
pub(super) fn cvtnum(what: &str, s: &str) -> Result<u64, CliError> {
    cvtnum_full(what, s, 0, i64::MAX as u64)
}

/// qemu-img's `cvtnum_full`: a size argument within bounds.
pub(super) fn cvtnum_full(what: &str, s: &str, min: u64, max: u64) -> Result<u64, CliError> {
    // qemu's rules ("-5" out of range, "-1k" and "0x10k" invalid) are parse_size's
    match parse_size(s) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        Err(SizeError::Invalid) => Err(CliError::Msg(format!("Invalid {what} specified: '{s}'."))),
        _ => Err(CliError::Msg(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        ))),
    }
}

fn size_arg(s: &str) -> Result<u64, CliError> {
    cvtnum("image size", s)
}

fn create(argv: &[String]) -> VerbResult {
    let a: CreateArgs = args::parse("create", argv)?;
    let format_name = a.format.clone().unwrap_or_else(|| "raw".to_string());
    if wants_help(&a.options) {
        let format = parse_format(&format_name)?;
        print_opts_help(format, a.rest.first().map(String::as_str));
        return Ok(0);
    }
    let Some(filename) = a.rest.first().cloned() else {
        return Err(CliError::Usage(
            "Expecting image file name".into(),
            "create",
        ));
    };
    if a.rest.len() > 2 {
        return Err(CliError::Usage(
            "Expecting one image file name".into(),
            "create",
        ));
    }
    let format = Format::from_name(&format_name)
        .map_err(|_| CliError::Msg(format!("{filename}: Unknown file format '{format_name}'")))?;
    let mut options = merge_opts(&a.options)?;
    // -o is checked first, in order, as qemu parses it: before -b, the size argument and the
    // `Formatting` line
    let known = crate::formats::create_options(format)
        .iter()
        .chain(crate::formats::raw::PROTOCOL_OPTS);
    options
        .check_typed(known, &filename)
        .map_err(CliError::Lib)?;
    if let Some(b) = &a.backing {
        options.set("backing_file", b);
    }
    if let Some(f) = &a.backing_format {
        options.set("backing_fmt", f);
    }
    let size = a.rest.get(1).map(|s| size_arg(s)).transpose()?;
    let req = ops::create::CreateRequest {
        filename: filename.clone(),
        format,
        options,
        size,
        unsafe_backing: a.unsafe_backing,
    };
    let opts = req.resolve()?;
    if opts.get("size").is_none() {
        return Err(CliError::Msg(format!(
            "{filename}: Image creation needs a size parameter"
        )));
    }
    if !a.quiet {
        println!("{}", req.formatting_line(&opts));
        let _ = std::io::stdout().flush();
    }
    req.run(&opts).map_err(|e| {
        if e.message().starts_with(&format!("{filename}:")) {
            CliError::Lib(e)
        } else {
            CliError::Lib(e.context(&filename))
        }
    })?;
    Ok(0)
}

/// One `key=value` (or flag) of a QemuOpts string, as qemu's `get_opt_name_value` reads
/// it: a value ends at a single comma (`,,` is a literal comma); a flag `foo` is `foo=on`,
/// `nofoo` is `foo=off`. Returns (name, value, written as a flag with this prefix, rest).
fn qemu_opt_next(params: &str) -> (String, String, Option<&'static str>, &str) {
    let len = params.find(['=', ',']).unwrap_or(params.len());
    let (name, value, flag, mut rest);
    if params[len..].starts_with('=') {
        name = params[..len].to_string();
        let mut v = String::new();
        let mut p = &params[len + 1..];
        loop {
            match p.find(',') {
                Some(i) if p[i + 1..].starts_with(',') => {
                    v.push_str(&p[..=i]);
                    p = &p[i + 2..];
                }
                Some(i) => {
                    v.push_str(&p[..i]);
                    p = &p[i..];
                    break;
                }
                None => {
                    v.push_str(p);
                    p = "";
                    break;
                }
            }
        }
        (value, flag, rest) = (v, None, p);
    } else if let Some(n) = params[..len].strip_prefix("no") {
        name = n.to_string();
        (value, flag, rest) = ("off".to_string(), Some("no"), &params[len..]);
    } else {
        name = params[..len].to_string();
        (value, flag, rest) = ("on".to_string(), Some(""), &params[len..]);
    }
    if let Some(r) = rest.strip_prefix(',') {
        rest = r;
    }
    (name, value, flag, rest)
}

/// qemu's `id_wellformed`.
fn id_wellformed(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || "-._".contains(x))
}

/// `-l SNAPSHOT_PARAM` of convert and measure: `snapshot.id=ID,snapshot.name=NAME` parsed as
/// qemu parses its QemuOpts (warnings, help, errors), or else an ID or name.
pub(super) fn snapshot_param(arg: &str) -> Result<crate::formats::SnapshotSel, CliError> {
    use crate::formats::SnapshotSel;
    if !arg.starts_with("snapshot.") {
        return Ok(SnapshotSel::IdOrName(arg.to_string()));
    }
    let failed = |why: String| {
        CliError::Msg(format!(
            "{why}\n{}: Failed in parsing snapshot param '{arg}'",
            prog()
        ))
    };
    // the QemuOpts id is looked for first
    let mut p = arg;
    while !p.is_empty() {
        let (k, v, _, rest) = qemu_opt_next(p);
        if k == "id" {
            if !id_wellformed(&v) {
                return Err(failed("Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.".into()));
            }
            break;
        }
        p = rest;
    }
    let (mut id, mut name) = (None, None);
    let mut p = arg;
    while !p.is_empty() {
        let (k, v, flag, rest) = qemu_opt_next(p);
        p = rest;
        if flag == Some("") && (k == "help" || k == "?") {
            println!("snapshot options:");
            println!("  {:<22} - snapshot id", "snapshot.id=<str>");
            println!("  {:<22} - snapshot name", "snapshot.name=<str>");
            return Err(CliError::Msg(format!(
                "Failed in parsing snapshot param '{arg}'"
            )));
        }
        if let Some(prefix) = flag {
            eprintln!(
                "{}: warning: short-form boolean option '{prefix}{k}' deprecated\nPlease use {k}={v} instead",
                prog()
            );
        }
        match k.as_str() {
            "id" => {}
            "snapshot.id" => id = Some(v),
            "snapshot.name" => name = Some(v),
            _ => return Err(failed(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(SnapshotSel::Exact { id, name })
}

/// Prints a warning as qemu's `warn_report` does.
fn print_warning(msg: &str) {
    eprintln!("{}: warning: {msg}", prog());
}

fn convert(argv: &[String]) -> VerbResult {
    let a: ConvertArgs = args::parse("convert", argv)?;
    // `-s` (the old form) is taken as `-l ID_OR_NAME`
    let snapshot = match (&a.snapshot_params, &a.snapshot) {
        (Some(l), _) => Some(snapshot_param(l)?),
        (None, Some(s)) => Some(crate::formats::SnapshotSel::IdOrName(s.clone())),
        (None, None) => None,
    };
    let mut o = ops::convert::ConvertOptions::new(Vec::new(), String::new());
    if let Some(sz) = &a.sparse_size {
        let v = cvtnum("buffer size for sparse output", sz)?;
        if v % 512 != 0 || v / 512 > 32768 {
            return Err(CliError::Msg(
                "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).".into(),
            ));
        }
        o.sparse_size = v;
    }
    if let Some(m) = &a.parallel {
        o.workers = match m.parse::<usize>() {
            Ok(n) if (1..=16).contains(&n) => n,
            _ => {
                return Err(CliError::Msg(
                    "Invalid number of coroutines specified. Must be between 1 and 16.".into(),
                ))
            }
        };
    }
    if let Some(r) = &a.rate {
        o.rate = Some(cvtnum("rate limit", r)?);
    }
    if a.skip_broken_bitmaps && !a.bitmaps {
        return Err(CliError::Msg(
            "Use of --skip-broken-bitmaps requires --bitmaps".into(),
        ));
    }
    if a.compress && a.copy_range {
        return Err(CliError::Msg(
            "Cannot enable copy offloading when -c is used".into(),
        ));
    }
    if a.sparse_size.is_some() && a.copy_range {
        return Err(CliError::Msg(
            "Cannot enable copy offloading when -S is used".into(),
        ));
    }
    if a.copy_range && a.salvage {
        return Err(CliError::Msg(
            "Cannot use copy offloading in salvaging mode".into(),
        ));
    }
    if a.target_image_opts && !a.no_create {
        return Err(CliError::Msg(
            "--target-image-opts requires use of -n flag".into(),
        ));
    }
    if a.no_create && !a.options.is_empty() {
        return Err(CliError::Msg(
            "-o has no effect when skipping image creation".into(),
        ));
    }
    if a.target_is_zero && !a.no_create {
        return Err(CliError::Msg(
            "--target-is-zero requires use of -n flag".into(),
        ));
    }
    if wants_help(&a.options) {
        let f = a.target_format.as_deref().unwrap_or("raw");
        print_opts_help(parse_format(f)?, a.files.last().map(String::as_str));
        return Ok(0);
    }
    if a.files.len() < 2 {
        return Err(CliError::Msg("Must specify image file name".into()));
    }
    let cache = |c: &Option<String>, what: &str| -> Result<bool, CliError> {
        match c.as_deref() {
            None | Some("writeback") | Some("unsafe") | Some("writethrough") => Ok(false),
            Some("none") | Some("directsync") => Ok(true),
            Some(other) => Err(CliError::Msg(format!("Invalid {what}: {other}"))),
        }
    };
    o.src_direct = cache(&a.src_cache, "source cache option")?;
    let (target, sources) = a.files.split_last().expect("two or more");
    // (file, specification) of each --image-opts image, to word open errors as qemu-img
    let mut specs: Vec<(String, String)> = Vec::new();
    let mut spec_share = false;
    if a.image_opts {
        if a.format.is_some() {
            return Err(CliError::Msg(
                "--image-opts and --format are mutually exclusive".into(),
            ));
        }
        for s in sources {
            let sp = imgopts::parse(s, a.force_share)?;
            spec_share |= sp.force_share;
            o.sources.push(sp.filename.clone());
            o.source_formats.push(sp.format);
            specs.push((sp.filename, s.clone()));
        }
    } else {
        o.sources = sources.to_vec();
        o.source_format = open_format(&a.format, &sources[0])?;
    }
    o.target = target.clone();
    o.target_format = a.target_format.clone().unwrap_or_else(|| "raw".into());
    o.target_opts = merge_opts(&a.options)?;
    o.compress = a.compress;
    o.no_create = a.no_create;
    o.target_is_zero = a.target_is_zero;
    o.backing = a.backing.clone();
    o.backing_format = a.backing_format.clone();
    o.force_share = a.force_share || spec_share;
    o.out_of_order = a.oob_writes;
    o.salvage = a.salvage;
    o.copy_range = a.copy_range;
    o.snapshot = snapshot;
    o.bitmaps = a.bitmaps;
    o.skip_broken_bitmaps = a.skip_broken_bitmaps;
    o.warn = Some(print_warning);
    o.tgt_direct = cache(&a.tgt_cache, "cache option")?;
    o.tgt_flush = !matches!(a.tgt_cache.as_deref(), None | Some("unsafe"));
    if a.target_image_opts {
        // (-n is required, checked above) the format comes from the specification
        if a.target_format.is_some() {
            return Err(CliError::Msg(
                "--image-opts and --format are mutually exclusive".into(),
            ));
        }
        let sp = imgopts::parse(target, false)?;
        let format = sp
            .format
            .unwrap_or_else(|| crate::formats::probe_path(&sp.filename));
        o.target = sp.filename.clone();
        o.target_format = format.name().to_string();
        o.target_probe = sp.format.is_none();
        specs.push((sp.filename, target.clone()));
    }
    // `--progress[=text|json]`; `--progress-json` is the older spelling of `=json`
    let (text_progress, json_progress) = match a.progress_mode.as_deref() {
        None => (a.progress, a.progress_json),
        Some("text") => (true, a.progress_json),
        Some("json") => (a.progress, true),
        Some(other) => {
            return Err(CliError::Msg(format!(
                "Invalid progress output specified: '{other}'. Valid values are 'text' and 'json'."
            )))
        }
    };
    if target == "-" && (text_progress || json_progress) && !a.quiet {
        // progress goes to stdout, which carries the image
        return Err(CliError::Msg(
            "-p cannot be used when the target is standard output ('-')".into(),
        ));
    }
    let progress = Progress::new(text_progress && !a.quiet, json_progress && !a.quiet, 1.0);
    if !json_progress {
        // qemu-img's first line before the sources are open; JSON waits for the real total
        progress.report(0, 1);
    }
    let cb = |d: u64, t: u64| progress.report(d, t);
    let r = ops::convert::convert(&o, Some(&cb));
    progress.finish();
    r.map_err(|e| match reworded(&specs, e.message()) {
        Some(m) => e.with_message(m),
        None => e,
    })?;
    Ok(0)
}

fn map(argv: &[String]) -> VerbResult {
    let mut a: MapArgs = args::parse("map", argv)?;
    let specs = common_specs(a.image_opts, &mut a.common, &mut a.files)?;
    reword_specs(&specs, map_with(a))
}

fn map_with(a: MapArgs) -> VerbResult {
    let start = a
        .start_offset
        .as_deref()
        .map(|s| cvtnum("start offset", s))
        .transpose()?
        .unwrap_or(0);
    let max_len = a
        .max_length
        .as_deref()
        .map(|s| cvtnum("max length", s))
        .transpose()?;
    if a.files.len() != 1 {
        return Err(CliError::Usage(
            "Expecting one image file name".into(),
            "map",
        ));
    }
    let json = parse_output(&a.common.output, "map")?;
    let file = &a.files[0];
    let opts = crate::OpenOptions {
        format: open_format(&a.common.format, file)?,
        force_share: a.common.force_share,
        ..Default::default()
    };
    let img = crate::formats::open(file, &opts)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let io_err = |e: std::io::Error| crate::Error::io(e, "stdout");
    if json {
        let _ = write!(out, "[");
        let mut prev: Option<String> = None;
        ops::map::map(img.as_ref(), start, max_len, |e| {
            if let Some(p) = prev.take() {
                writeln!(out, "{p},").map_err(io_err)?;
            }
            prev = Some(e.to_json_line());
            Ok(())
        })?;
        if let Some(p) = prev {
            write!(out, "{p}").map_err(io_err)?;
        }
        let _ = writeln!(out, "]");
    } else {
        let _ = writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        );
        // qemu treats zero-data as plain zero in this format, which merges more runs
        let mut cur: Option<ops::map::MapEntry> = None;
        let print = |out: &mut dyn Write, e: &ops::map::MapEntry| -> crate::Result<()> {
            if e.data && e.offset.is_none() {
                return Err(crate::Error::unsupported(
                    "File contains external, encrypted or compressed clusters.",
                ));
            }
            if e.data && !e.zero {
                writeln!(
                    out,
                    "{:<16}{:<16}{:<16}{}",
                    hex(e.start),
                    hex(e.length),
                    hex(e.offset.unwrap_or(0)),
                    e.filename.as_deref().unwrap_or("")
                )
                .map_err(io_err)?;
            }
            Ok(())
        };
        let r = ops::map::map(img.as_ref(), start, max_len, |e| {
            let mut e = e.clone();
            if !e.data || e.zero {
                e.data = false;
                e.zero = true;
            }
            match &mut cur {
                Some(c)
                    if c.zero
                        && e.zero
                        && c.depth == e.depth
                        && c.present == e.present
                        && c.compressed == e.compressed
                        && c.offset.is_some() == e.offset.is_some()
                        && c.filename == e.filename
                        && c.offset.map(|o| o + c.length) == e.offset =>
                {
                    c.length += e.length
                }
                _ => {
                    if let Some(c) = cur.take() {
                        print(&mut out, &c)?;
                    }
                    cur = Some(e);
                }
            }
            Ok(())
        });
        r?;
        if let Some(c) = cur {
            print(&mut out, &c)?;
        }
    }
    Ok(0)
}

/// `%#x` as C prints it (0 stays `0`).
fn hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

fn compare(argv: &[String]) -> VerbResult {
    let mut a: CompareArgs = args::parse("compare", argv)?;
    if a.files.len() != 2 {
        return Err(CliError::Usage(
            "Expecting two image file names".into(),
            "compare",
        ));
    }
    let (first, second) = a.files.split_at_mut(1);
    let specs = image_specs(a.image_opts, &mut a.format1, &mut a.force_share, first)
        .and_then(|mut s| {
            s.extend(image_specs(
                a.image_opts,
                &mut a.format2,
                &mut a.force_share,
                second,
            )?);
            Ok(s)
        })
        // compare's errors exit with 2
        .map_err(|e| CliError::Exit(super::print_error(&e).max(2)))?;
    reword_specs(&specs, compare_with(a, &specs))
}

fn compare_with(a: CompareArgs, specs: &[(String, String)]) -> VerbResult {
    let open =
        |file: &str, fmt: &Option<String>| -> Result<Box<dyn crate::BlockDriver>, CliError> {
            let opts = crate::OpenOptions {
                format: open_format(fmt, file)?,
                force_share: a.force_share,
                ..Default::default()
            };
            crate::formats::open(file, &opts).map_err(|e| {
                let m = reworded(specs, e.message()).unwrap_or_else(|| e.message().to_string());
                eprintln!("{}: {m}", prog());
                CliError::Exit(2)
            })
        };
    let img1 = open(&a.files[0], &a.format1)?;
    let img2 = open(&a.files[1], &a.format2)?;
    let progress = Progress::new(a.progress && !a.quiet, false, 2.0);
    progress.report(0, 1);
    let cb = |d: u64, t: u64| progress.report(d, t);
    let r = ops::compare::compare(img1.as_ref(), img2.as_ref(), a.strict, &cb);
    let say = |m: &str| {
        if !a.quiet {
            println!("{m}");
        }
    };
    use ops::compare::CompareResult as R;
    let code = match r {
        Ok(R::Identical { size_mismatch }) => {
            if size_mismatch {
                say("Warning: Image size mismatch!");
            }
            say("Images are identical.");
            Ok(0)
        }
        Ok(R::Mismatch {
            offset,
            size_mismatch,
        }) => {
            if size_mismatch {
                say("Warning: Image size mismatch!");
            }
            say(&format!("Content mismatch at offset {offset}!"));
            Ok(1)
        }
        Ok(R::StrictSizeMismatch) => {
            say("Strict mode: Image size mismatch!");
            Ok(1)
        }
        Ok(R::StrictStatusMismatch(off)) => {
            say(&format!("Strict mode: Offset {off} block status mismatch!"));
            Ok(1)
        }
        Err(e) => {
            eprintln!("{}: {}", prog(), e.message());
            Ok(if e.message().starts_with("Error while reading") {
                4
            } else {
                3
            })
        }
    };
    progress.finish();
    code
}

fn resize(argv: &[String]) -> VerbResult {
    // The size is always the last argument, so that `-1G` is not taken for an option.
    let expecting = || CliError::Usage("Expecting image file name and size".into(), "resize");
    let Some((size, rest)) = argv.split_last() else {
        return Err(expecting());
    };
    let mut a: ResizeArgs = args::parse("resize", rest)?;
    image_specs(a.image_opts, &mut a.format, &mut false, &mut a.files)?;
    if let Some(p) = &a.preallocation {
        if !["off", "metadata", "falloc", "full"].contains(&p.as_str()) {
            return Err(CliError::Msg(format!("Invalid preallocation mode '{p}'")));
        }
    }
    if a.files.len() != 1 {
        return Err(expecting());
    }
    let (ctor, num): (fn(u64) -> ops::resize::SizeChange, &str) = match size.as_bytes().first() {
        Some(b'+') => (ops::resize::SizeChange::Grow, &size[1..]),
        Some(b'-') => (ops::resize::SizeChange::Shrink, &size[1..]),
        _ => (ops::resize::SizeChange::Absolute, size.as_str()),
    };
    let n = parse_size(num).map_err(|_| {
        CliError::Msg("Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.".into())
    })?;
    let file = &a.files[0];
    let opts = ops::resize::ResizeOptions {
        format: open_format(&a.format, file)?,
        prealloc: a.preallocation.clone(),
        shrink: a.shrink,
    };
    match ops::resize::resize(file, ctor(n), &opts) {
        Ok(_) => {
            if !a.quiet {
                println!("Image resized.");
            }
            Ok(0)
        }
        Err(e) if e.message().starts_with("Use the --shrink") => {
            eprintln!("{}: {}", prog(), e.message());
            eprintln!("{}: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.", prog());
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}

fn dd(argv: &[String]) -> VerbResult {
    let a: DdArgs = args::parse("dd", argv)?;
    let mut o = ops::dd::DdOptions {
        input: String::new(),
        output: String::new(),
        input_format: None,
        output_format: Format::Raw,
        block_size: 512,
        count: None,
        skip: None,
        force_share: a.force_share,
    };
    let (mut have_if, mut have_of) = (false, false);
    for op in &a.operands {
        let Some((k, v)) = op.split_once('=') else {
            return Err(CliError::Msg(format!("unrecognized operand {op}")));
        };
        match k {
            "bs" => o.block_size = cvtnum_full("bs", v, 1, i32::MAX as u64)?,
            "count" => o.count = Some(cvtnum("count", v)?),
            "skip" => o.skip = Some(cvtnum("skip", v)?),
            "if" => {
                o.input = v.to_string();
                have_if = true;
            }
            "of" => {
                o.output = v.to_string();
                have_of = true;
            }
            _ => return Err(CliError::Msg(format!("unrecognized operand {k}"))),
        }
    }
    if !(have_if && have_of) {
        return Err(CliError::Msg(
            "Must specify both input and output files".into(),
        ));
    }
    let mut format = a.format.clone();
    let mut input = [std::mem::take(&mut o.input)];
    image_specs(a.image_opts, &mut format, &mut o.force_share, &mut input)?;
    let [input] = input;
    o.input = input;
    o.input_format = open_format(&format, &o.input)?;
    // the input is opened before the output format is looked at
    if let Some(f) = &a.output_format {
        if Format::from_name(f).is_err() {
            crate::formats::open(
                &o.input,
                &crate::OpenOptions {
                    format: o.input_format,
                    force_share: o.force_share,
                    ..Default::default()
                },
            )?;
            return Err(CliError::Msg("Unknown file format".into()));
        }
        o.output_format = parse_format(f)?;
    }
    let r = ops::dd::dd(&o)?;
    if r.skipped_past_end {
        eprintln!("{}: {}: cannot skip to specified offset", prog(), o.input);
    }
    Ok(0)
}

fn check(argv: &[String]) -> VerbResult {
    let mut a: CheckArgs = args::parse("check", argv)?;
    let specs = common_specs(a.image_opts, &mut a.common, &mut a.files)?;
    // the JSON names the image as given (the specification)
    let shown = specs.first().map(|(_, spec)| spec.clone());
    reword_specs(&specs, check_with(a, shown))
}

fn check_with(a: CheckArgs, shown: Option<String>) -> VerbResult {
    let repair = match a.repair.as_deref() {
        None => None,
        Some("leaks") => Some(crate::formats::RepairMode::Leaks),
        Some("all") => Some(crate::formats::RepairMode::All),
        Some(o) => {
            return Err(CliError::Usage(
                format!("--repair (-r) expects 'leaks' or 'all' not '{o}'"),
                "check",
            ))
        }
    };
    if a.files.len() != 1 {
        return Err(CliError::Usage(
            "Expecting one image file name".into(),
            "check",
        ));
    }
    let json = parse_output(&a.common.output, "check")?;
    let file = &a.files[0];
    let opts = ops::check::CheckOptions {
        format: open_format(&a.common.format, file)?,
        repair,
        force_share: a.common.force_share,
    };
    let out = match ops::check::check(file, &opts) {
        Ok(o) => o,
        Err(e) if ops::check::is_unsupported(&e) => {
            eprintln!("{}: This image format does not support checks", prog());
            return Ok(63);
        }
        Err(e) => return Err(e.into()),
    };
    for f in &out.first.findings {
        eprintln!("{}", f.message);
    }
    if out.repaired {
        // qemu-img prints what the double check finds too
        for f in &out.last.findings {
            eprintln!("{}", f.message);
        }
    }
    let r = &out.last;
    let quiet = a.quiet;
    let mut text = String::new();
    if json {
        use crate::qjson::Obj;
        let nz = |v: u64| if v != 0 { Some(v) } else { None };
        let mut o = Obj::new()
            .with("filename", shown.as_deref().unwrap_or(file))
            .with("format", out.format.name())
            .with("check-errors", r.check_errors)
            .with_opt("image-end-offset", nz(r.image_end_offset))
            .with_opt("corruptions", nz(r.corruptions))
            .with_opt("leaks", nz(r.leaks))
            .with_opt("corruptions-fixed", nz(r.corruptions_fixed))
            .with_opt("leaks-fixed", nz(r.leaks_fixed))
            .with_opt("total-clusters", nz(r.total_clusters))
            .with_opt("allocated-clusters", nz(r.allocated_clusters))
            .with_opt("fragmented-clusters", nz(r.fragmented_clusters))
            .with_opt("compressed-clusters", nz(r.compressed_clusters));
        // diskit's extra: what was found, beside qemu's fields
        let found: Vec<Json> = out
            .first
            .findings
            .iter()
            .filter(|f| f.cluster.is_some() || f.offset.is_some())
            .map(|f| {
                Json::Obj(
                    Obj::new()
                        .with("kind", f.kind.as_str())
                        .with_opt("cluster", f.cluster)
                        .with_opt("offset", f.offset),
                )
            })
            .collect();
        if !found.is_empty() {
            o.push("findings", found);
        }
        text = format!("{}\n", qjson::to_pretty(&Json::Obj(o)));
    } else {
        if out.repaired {
            text.push_str(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                r.leaks_fixed, r.corruptions_fixed
            ));
        }
        if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
            text.push_str("No errors were found on the image.\n");
        } else {
            if r.corruptions > 0 {
                text.push_str(&format!("\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", r.corruptions));
            }
            if r.leaks > 0 {
                text.push_str(&format!("\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", r.leaks));
            }
            if r.check_errors > 0 {
                text.push_str(&format!(
                    "\n{} internal errors have occurred during the check.\n",
                    r.check_errors
                ));
            }
        }
        if r.total_clusters != 0 && r.allocated_clusters != 0 {
            text.push_str(&format!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                r.allocated_clusters,
                r.total_clusters,
                r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64,
                r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64,
                r.compressed_clusters as f64 * 100.0 / r.allocated_clusters as f64
            ));
        }
        if r.image_end_offset != 0 {
            text.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
        }
    }
    if !quiet {
        print!("{text}");
        let _ = std::io::stdout().flush();
    }
    if r.check_errors > 0 {
        eprintln!("{}: Check failed", prog());
        return Ok(1);
    }
    Ok(ops::check::exit_code(r))
}

fn measure(argv: &[String]) -> VerbResult {
    let mut a: MeasureArgs = args::parse("measure", argv)?;
    let specs = common_specs(a.image_opts, &mut a.common, &mut a.files)?;
    reword_specs(&specs, measure_with(a))
}

fn measure_with(a: MeasureArgs) -> VerbResult {
    let snapshot = a.snapshot.as_deref().map(snapshot_param).transpose()?;
    let json = parse_output(&a.common.output, "measure")?;
    if a.files.len() > 1 {
        return Err(CliError::Msg(
            "At most one filename argument is allowed.".into(),
        ));
    }
    let size = a
        .size
        .as_deref()
        .map(|s| cvtnum("image size", s))
        .transpose()?;
    let file = a.files.first().cloned();
    if file.is_none() && (a.image_opts || a.common.format.is_some() || a.snapshot.is_some()) {
        return Err(CliError::Msg(
            "--image-opts, -f, and -l require a filename argument.".into(),
        ));
    }
    if file.is_some() && size.is_some() {
        return Err(CliError::Msg(
            "--size N cannot be used together with a filename.".into(),
        ));
    }
    if file.is_none() && size.is_none() {
        return Err(CliError::Msg(
            "Either --size N or one filename must be specified.".into(),
        ));
    }
    let source_format = match &file {
        Some(f) => open_format(&a.common.format, f)?,
        None => None,
    };
    if let Some(f) = &file {
        // the source is opened before the target format is looked at
        let img = crate::formats::open(
            f,
            &crate::OpenOptions {
                format: source_format,
                force_share: a.common.force_share,
                ..Default::default()
            },
        )?;
        if let Some(sel) = &snapshot {
            ops::measure::load_snapshot(img.as_ref(), sel)?;
        }
    }
    let tname = a.target_format.clone().unwrap_or_else(|| "raw".into());
    let target_format = Format::from_name(&tname)
        .map_err(|_| CliError::Msg(format!("Unknown file format '{tname}'")))?;
    let opts = merge_opts(&a.options)?;
    for (k, _) in opts.iter() {
        let known = crate::formats::create_options(target_format)
            .iter()
            .chain(crate::formats::raw::PROTOCOL_OPTS)
            .any(|d| d.name == k);
        if !known {
            return Err(CliError::Msg(format!(
                "Invalid parameter '{k}'\n{}: Invalid options for file format '{tname}'",
                prog()
            )));
        }
    }
    let m = ops::measure::measure(&ops::measure::MeasureOptions {
        target_format,
        opts,
        size,
        source: file,
        source_format,
        force_share: a.common.force_share,
        snapshot,
    })?;
    if json {
        let o = crate::qjson::Obj::new()
            .with_opt("bitmaps", m.bitmaps)
            .with("required", m.required)
            .with("fully-allocated", m.fully_allocated);
        println!("{}", qjson::to_pretty(&Json::Obj(o)));
    } else {
        println!("required size: {}", m.required);
        println!("fully allocated size: {}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(0)
}

/// `compact [-f FMT] [-q] FILENAME` (diskit extension): shrink a VDI image in place.
fn compact(argv: &[String]) -> VerbResult {
    let a: args::CompactArgs = args::parse("compact", argv)?;
    if a.files.len() != 1 {
        return Err(CliError::Usage(
            "Expecting one image file name".into(),
            "compact",
        ));
    }
    let file = &a.files[0];
    let s = ops::compact::compact(file, open_format(&a.format, file)?)?;
    if !a.quiet {
        println!(
            "Image compacted: {} zero blocks released, {} blocks moved, file size {} -> {} bytes.",
            s.blocks_released, s.blocks_moved, s.old_file_size, s.new_file_size
        );
    }
    Ok(0)
}
