//! The verbs that work on backing chains: `commit` and `rebase`, parsed the way qemu-img's
//! getopt does.

use super::progress::Progress;
use super::qverbs::{format_arg, getopt, l, o};
use super::verbs::cvtnum;
use super::{prog, CliError, VerbResult};
use crate::ops;

const COMMIT_HELP: &str = "Usage:
Commit image to its backing file.  Usage:

  PROG commit [-f FMT | --image-opts] [-t CACHE_MODE] [-b BASE_IMG] [-d]
        [-r RATE] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -p, --progress
     show operation progress
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -t, --cache CACHE_MODE image cache mode (writeback)
  -d, --drop
     skip emptying FILENAME on completion
  -b, --base BASE_IMG
     image in the backing chain to which to commit changes
     instead of the previous one (implies --drop)
  -r, --rate RATE
     I/O rate limit
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     name of the image file to operate on
";

const REBASE_HELP: &str = "Usage:
Change backing file of the image.  Usage:

  PROG rebase [-f FMT | --image-opts] [-t CACHE] [-q] [-U] [-p]
        [-b BACKING_FILENAME [-F BACKING_FMT] [-T BACKING_CACHE]] [-u]
        [--object OBJDEF] [-c] FILENAME
Rebases FILENAME on top of BACKING_FILENAME or no backing file

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progress
     show progress indicator
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  -b, --backing BACKING_FILENAME|\"\"
     rebase onto this file (or no backing file)
  -F, --backing-format BACKING_FMT
     specify format for BACKING_FILENAME
  -T, --backing-cache CACHE
     BACKING_FILENAME cache mode (writeback)
  -u, --backing-unsafe
     do not fail if BACKING_FILENAME can not be read
  -c, --compress
     compress image (when image supports this)
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file name (or specification with --image-opts)

";

/// qemu's cache modes (all accepted; diskit always goes through the page cache).
fn valid_cache(mode: &str) -> bool {
    matches!(
        mode,
        "none" | "off" | "writeback" | "unsafe" | "directsync" | "writethrough"
    )
}

/// `commit [-f FMT | --image-opts] [-t CACHE] [-b BASE] [-d] [-p] [-q] [-r RATE] FILENAME`
pub fn commit(argv: &[String]) -> VerbResult {
    let spec = [
        o('h', "help", false, "h"),
        o('f', "format", true, "f"),
        o('t', "cache", true, "t"),
        o('b', "base", true, "b"),
        o('d', "drop", false, "d"),
        o('p', "progress", false, "p"),
        o('q', "quiet", false, "q"),
        o('r', "rate", true, "r"),
        l("object", true, "object"),
        l("image-opts", false, "image-opts"),
    ];
    let (opts, mut files) = getopt("commit", argv, &spec)?;
    let image_opts = opts.iter().any(|(k, _)| *k == "image-opts");
    let mut format = None;
    let mut cache = "writeback".to_string();
    let mut base = None;
    let mut drop = false;
    let mut progress = false;
    let mut quiet = false;
    let mut rate = None;
    for (k, v) in opts {
        match k {
            "h" => {
                print!("{}", COMMIT_HELP.replace("PROG", prog()));
                return Ok(0);
            }
            "f" => format = Some(v),
            "t" => cache = v,
            "b" => {
                base = Some(v);
                drop = true;
            }
            "d" => drop = true,
            "p" => progress = true,
            "q" => quiet = true,
            "r" => rate = Some(cvtnum("rate limit", &v)?),
            _ => {}
        }
    }
    if files.len() != 1 {
        return Err(CliError::Usage(
            "Expecting one image file name".into(),
            "commit",
        ));
    }
    super::verbs::image_specs(image_opts, &mut format, &mut false, &mut files)?;
    let file = &files[0];
    if !valid_cache(&cache) {
        return Err(CliError::Msg(format!("Invalid cache option: {cache}")));
    }
    let o = ops::commit::CommitOptions {
        format: format_arg(format.as_deref(), file)?,
        base,
        drop,
        rate,
        ..Default::default()
    };
    let bar = Progress::new(progress && !quiet, false, 1.0);
    bar.report(0, 1);
    let cb = |d: u64, t: u64| bar.report(d, t);
    let r = ops::commit::commit(file, &o, Some(&cb));
    bar.finish();
    r?;
    if !quiet {
        println!("Image committed.");
    }
    Ok(0)
}

/// `rebase [-f FMT] [-t CACHE] [-q] [-U] [-p] [-b BACKING [-F FMT] [-T CACHE]] [-u] [-c] FILENAME`
pub fn rebase(argv: &[String]) -> VerbResult {
    let spec = [
        o('h', "help", false, "h"),
        o('f', "format", true, "f"),
        o('F', "backing-format", true, "F"),
        o('b', "backing", true, "b"),
        o('u', "backing-unsafe", false, "u"),
        o('p', "progress", false, "p"),
        o('t', "cache", true, "t"),
        o('T', "backing-cache", true, "T"),
        o('q', "quiet", false, "q"),
        o('U', "force-share", false, "U"),
        o('c', "compress", false, "c"),
        l("object", true, "object"),
        l("image-opts", false, "image-opts"),
    ];
    let (opts, mut files) = getopt("rebase", argv, &spec)?;
    let image_opts = opts.iter().any(|(k, _)| *k == "image-opts");
    let mut o = ops::rebase::RebaseOptions::default();
    let mut format = None;
    let mut cache = "writeback".to_string();
    let mut src_cache = "writeback".to_string();
    let mut progress = false;
    let mut quiet = false;
    for (k, v) in opts {
        match k {
            "h" => {
                print!("{}", REBASE_HELP.replace("PROG", prog()));
                return Ok(0);
            }
            "f" => format = Some(v),
            "F" => o.backing_format = Some(v),
            "b" => o.backing = Some(v),
            "u" => o.unsafe_mode = true,
            "p" => progress = true,
            "t" => cache = v,
            "T" => src_cache = v,
            "q" => quiet = true,
            "U" => o.force_share = true,
            "c" => o.compress = true,
            _ => {}
        }
    }
    if files.len() != 1 {
        return Err(CliError::Usage(
            "Expecting one image file name".into(),
            "rebase",
        ));
    }
    if !o.unsafe_mode && o.backing.is_none() {
        return Err(CliError::Usage(
            "Must specify backing file (-b) or use unsafe mode (-u)".into(),
            "rebase",
        ));
    }
    super::verbs::image_specs(image_opts, &mut format, &mut o.force_share, &mut files)?;
    let file = &files[0];
    let bar = Progress::new(progress && !quiet, false, 2.0);
    bar.report(0, 1);
    let finish = |r: VerbResult| {
        bar.finish();
        r
    };
    if !valid_cache(&cache) {
        return finish(Err(CliError::Msg(format!("Invalid cache option: {cache}"))));
    }
    if !valid_cache(&src_cache) {
        return finish(Err(CliError::Msg(format!(
            "Invalid source cache option: {src_cache}"
        ))));
    }
    o.format = match format_arg(format.as_deref(), file) {
        Ok(f) => f,
        Err(e) => return finish(Err(e)),
    };
    let cb = |d: u64, t: u64| bar.report(d, t);
    let r = ops::rebase::rebase(file, &o, Some(&cb));
    finish(r.map(|()| 0).map_err(CliError::from))
}
