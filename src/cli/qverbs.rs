//! The verbs `snapshot`, `amend` and `bitmap`, parsed the way qemu-img's getopt does (the
//! order of options matters for their "Cannot mix" checks).

use std::io::Write;

use super::progress::Progress;
use super::{human, prog, CliError, VerbResult};
use crate::formats::Format;
use crate::ops;

/// One option of a verb: short letter (or none), long name (or none), takes an argument.
pub(super) struct Opt {
    short: Option<char>,
    long: Option<&'static str>,
    arg: bool,
    /// The key the caller matches on.
    key: &'static str,
}

pub(super) const fn o(short: char, long: &'static str, arg: bool, key: &'static str) -> Opt {
    Opt {
        short: Some(short),
        long: if long.is_empty() { None } else { Some(long) },
        arg,
        key,
    }
}

pub(super) const fn l(long: &'static str, arg: bool, key: &'static str) -> Opt {
    Opt {
        short: None,
        long: Some(long),
        arg,
        key,
    }
}

/// Options in command-line order (key, argument) and the operands.
pub(super) type Parsed = (Vec<(&'static str, String)>, Vec<String>);

/// GNU getopt_long with argument permutation: returns the options in order and the operands.
pub(super) fn getopt(
    verb: &'static str,
    argv: &[String],
    spec: &[Opt],
) -> Result<Parsed, CliError> {
    let mut opts = Vec::new();
    let mut operands = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let a = &argv[i];
        i += 1;
        if a == "--" {
            operands.extend(argv[i..].iter().cloned());
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let matches: Vec<&Opt> = spec
                .iter()
                .filter(|s| s.long.is_some_and(|l| l.starts_with(name)))
                .collect();
            let exact = spec.iter().find(|s| s.long == Some(name));
            let opt = match (exact, matches.len()) {
                (Some(e), _) => e,
                (None, 1) => matches[0],
                (None, 0) => {
                    return Err(CliError::Getopt(format!("unrecognized option '{a}'"), verb))
                }
                _ => {
                    return Err(CliError::Getopt(
                        format!("option '--{name}' is ambiguous"),
                        verb,
                    ))
                }
            };
            let full = opt.long.unwrap_or(name);
            if opt.arg {
                let v = match inline {
                    Some(v) => v,
                    None => {
                        if i >= argv.len() {
                            return Err(CliError::Getopt(
                                format!("option '--{full}' requires an argument"),
                                verb,
                            ));
                        }
                        i += 1;
                        argv[i - 1].clone()
                    }
                };
                opts.push((opt.key, v));
            } else {
                if inline.is_some() {
                    return Err(CliError::Getopt(
                        format!("option '--{full}' doesn't allow an argument"),
                        verb,
                    ));
                }
                opts.push((opt.key, String::new()));
            }
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a[1..].chars().collect();
            let mut k = 0;
            while k < chars.len() {
                let c = chars[k];
                k += 1;
                let Some(opt) = spec.iter().find(|s| s.short == Some(c)) else {
                    return Err(CliError::Getopt(format!("invalid option -- '{c}'"), verb));
                };
                if opt.arg {
                    let rest: String = chars[k..].iter().collect();
                    let v = if !rest.is_empty() {
                        rest
                    } else if i < argv.len() {
                        i += 1;
                        argv[i - 1].clone()
                    } else {
                        return Err(CliError::Getopt(
                            format!("option requires an argument -- '{c}'"),
                            verb,
                        ));
                    };
                    opts.push((opt.key, v));
                    break;
                }
                opts.push((opt.key, String::new()));
            }
            continue;
        }
        operands.push(a.clone());
    }
    Ok((opts, operands))
}

pub(super) fn format_arg(name: Option<&str>, file: &str) -> Result<Option<Format>, CliError> {
    match name {
        None => Ok(None),
        Some(n) => Format::from_name(n)
            .map(Some)
            .map_err(|_| CliError::Msg(format!("Could not open '{file}': Unknown driver '{n}'"))),
    }
}

const SNAPSHOT_HELP: &str = "Usage:
List or manipulate snapshots within image.  Usage:

  PROG snapshot [-f FMT | --image-opts] [-l | -a|-c|-d SNAPSHOT]
        [-U] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
      quiet operations
  -f, --format FMT
      specify FILENAME format explicitly
  --image-opts
      indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -U, --force-share
      open image in shared mode for concurrent access
  --object OBJDEF
      QEMU user-creatable object (eg encryption key)
  Operation, one of:
    -l, --list
       list snapshots in FILENAME (the default)
    -c, --create SNAPSHOT
       create named snapshot
    -a, --apply SNAPSHOT
       apply named snapshot to the base
    -d, --delete SNAPSHOT
       delete named snapshot
  FILENAME - image file name (or specification with --image-opts)

";

/// `snapshot [-f FMT | --image-opts] [-l | -a|-c|-d SNAPSHOT] [-q] [-U] FILENAME`
pub fn snapshot(argv: &[String]) -> VerbResult {
    use ops::snapshot::SnapshotAction as A;
    let spec = [
        o('h', "help", false, "h"),
        o('f', "format", true, "f"),
        o('l', "list", false, "l"),
        o('a', "apply", true, "a"),
        o('c', "create", true, "c"),
        o('d', "delete", true, "d"),
        o('q', "quiet", false, "q"),
        o('U', "force-share", false, "U"),
        l("object", true, "object"),
        l("image-opts", false, "image-opts"),
    ];
    let (opts, mut files) = getopt("snapshot", argv, &spec)?;
    let image_opts = opts.iter().any(|(k, _)| *k == "image-opts");
    let mut action: Option<A> = None;
    let mut format = None;
    let mut force_share = false;
    let mut quiet = false;
    for (k, v) in opts {
        let new = match k {
            "h" => {
                print!("{}", SNAPSHOT_HELP.replace("PROG", prog()));
                return Ok(0);
            }
            "f" => {
                format = Some(v);
                None
            }
            "l" => Some(A::List),
            "a" => Some(A::Apply(v)),
            "c" => Some(A::Create(v)),
            "d" => Some(A::Delete(v)),
            "q" => {
                quiet = true;
                None
            }
            "U" => {
                force_share = true;
                None
            }
            _ => None,
        };
        if let Some(n) = new {
            if action.is_some() {
                return Err(CliError::Usage(
                    "Cannot mix '-l', '-a', '-c', '-d'".into(),
                    "snapshot",
                ));
            }
            action = Some(n);
        }
    }
    let _ = quiet;
    if files.len() != 1 {
        return Err(CliError::Usage(
            "Expecting one image file name".into(),
            "snapshot",
        ));
    }
    super::verbs::image_specs(image_opts, &mut format, &mut force_share, &mut files)?;
    let file = &files[0];
    let action = action.unwrap_or(A::List);
    let opts = ops::snapshot::SnapshotOptions {
        format: format_arg(format.as_deref(), file)?,
        force_share,
    };
    let list = ops::snapshot::snapshot(file, &action, &opts)?;
    if action == A::List && !list.is_empty() {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "Snapshot list:");
        let _ = writeln!(out, "{}", human::snapshot_header());
        for sn in &list {
            let _ = writeln!(out, "{}", human::snapshot_line(sn));
        }
    }
    Ok(0)
}

fn print_amend_help(fmt: Format) -> VerbResult {
    if !ops::amend::supported(fmt) {
        return Err(CliError::Msg(format!(
            "Format driver '{fmt}' does not support option amendment"
        )));
    }
    println!("Amend options for '{fmt}':");
    for d in crate::formats::qcow2::amend::AMEND_OPTS {
        println!("{}", d.help_line());
    }
    Ok(0)
}

/// `amend [--object OBJDEF] [--image-opts] [-p] [-q] [-f FMT] [-t CACHE] [--force] -o OPTIONS FILENAME`
pub fn amend(argv: &[String]) -> VerbResult {
    let spec = [
        o('h', "help", false, "h"),
        o('o', "", true, "o"),
        o('f', "", true, "f"),
        o('t', "", true, "t"),
        o('p', "", false, "p"),
        o('q', "", false, "q"),
        l("object", true, "object"),
        l("image-opts", false, "image-opts"),
        l("force", false, "force"),
    ];
    let (opts, files) = getopt("amend", argv, &spec)?;
    let image_opts = opts.iter().any(|(k, _)| *k == "image-opts");
    let mut options: Option<crate::formats::CreateOpts> = None;
    let mut format = None;
    let mut force = false;
    let mut progress = false;
    let mut quiet = false;
    for (k, v) in opts {
        match k {
            "p" => progress = true,
            "q" => quiet = true,
            "h" => {
                println!("Usage: {} amend [--object OBJDEF] [--image-opts] [-p] [-q] [-f FMT] [-t CACHE] [--force] -o OPTIONS FILENAME", prog());
                return Ok(0);
            }
            "o" => {
                let o = options.get_or_insert_with(crate::formats::CreateOpts::new);
                o.merge(&v).map_err(CliError::Lib)?;
            }
            "f" => format = Some(v),
            "force" => force = true,
            _ => {}
        }
    }
    let Some(options) = options else {
        return Err(CliError::Usage("Must specify options (-o)".into(), "amend"));
    };
    // from here on qemu-img ends its progress line (a newline) whatever happens
    let bar = Progress::new(progress && !quiet, false, 1.0).sequential();
    let r = amend_image(&bar, options, format, force, image_opts, files);
    bar.finish();
    r
}

fn amend_image(
    bar: &Progress,
    options: crate::formats::CreateOpts,
    mut format: Option<String>,
    force: bool,
    image_opts: bool,
    mut files: Vec<String>,
) -> VerbResult {
    if let (Some(f), true) = (&format, options.wants_help()) {
        let fmt = Format::from_name(f)
            .map_err(|_| CliError::Msg(format!("Unknown file format '{f}'")))?;
        return print_amend_help(fmt);
    }
    if files.len() != 1 {
        return Err(CliError::Msg("Expecting one image file name".into()));
    }
    super::verbs::image_specs(image_opts, &mut format, &mut false, &mut files)?;
    let file = &files[0];
    let format = format_arg(format.as_deref(), file)?;
    if options.wants_help() {
        let img = crate::formats::open(
            file,
            &crate::formats::OpenOptions {
                format,
                write: true,
                ..Default::default()
            },
        )?;
        let fmt = img.format();
        drop(img);
        return print_amend_help(fmt);
    }
    let o = ops::amend::AmendOptions { format, force };
    // qemu-img shows 0% once the options are accepted, and 100% after the work, done or not
    let started = std::cell::Cell::new(false);
    let r = ops::amend::amend_with_progress(file, &options, &o, &|done, total| {
        started.set(true);
        bar.report(done, total)
    });
    if started.get() {
        bar.report(1, 1);
    }
    r?;
    Ok(0)
}
