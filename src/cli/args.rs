//! clap definitions of the verbs, and qemu-style wording of parse errors.

use clap::error::{ContextKind, ContextValue, ErrorKind as ClapKind};
use clap::{Args, Parser};

use super::CliError;

/// Parses `args` (without the verb) into `T`, reporting errors as qemu-img's getopt does.
pub fn parse<T: Parser>(verb: &'static str, args: &[String]) -> Result<T, CliError> {
    let mut full = vec![format!("{} {verb}", super::prog())];
    full.extend(args.iter().cloned());
    // getopt semantics: an option given twice takes its last value; a long option may be
    // abbreviated to any unambiguous prefix
    let cmd = T::command().args_override_self(true).infer_long_args(true);
    let parsed = cmd
        .try_get_matches_from(full)
        .and_then(|m| T::from_arg_matches(&m));
    parsed.map_err(|e| {
        let arg = match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(s)) => s.clone(),
            _ => String::new(),
        };
        let arg = arg.split(' ').next().unwrap_or("").to_string();
        match e.kind() {
            ClapKind::DisplayHelp | ClapKind::DisplayVersion => {
                let _ = e.print();
                CliError::Exit(0)
            }
            ClapKind::UnknownArgument => {
                if let Some(long) = arg.strip_prefix("--") {
                    CliError::Getopt(format!("unrecognized option '--{long}'"), verb)
                } else {
                    let c = arg.trim_start_matches('-').chars().next().unwrap_or('?');
                    CliError::Getopt(format!("invalid option -- '{c}'"), verb)
                }
            }
            ClapKind::InvalidValue | ClapKind::NoEquals | ClapKind::MissingRequiredArgument => {
                // clap names the option by its long form; getopt names it as typed.
                let typed = args
                    .iter()
                    .rev()
                    .find(|a| a.starts_with('-'))
                    .cloned()
                    .unwrap_or_default();
                let arg = if typed.starts_with("--") || typed.len() < 2 {
                    arg
                } else {
                    typed
                };
                if let Some(long) = arg.strip_prefix("--") {
                    let long = long.split('=').next().unwrap_or(long);
                    CliError::Getopt(format!("option '--{long}' requires an argument"), verb)
                } else {
                    let c = arg.trim_start_matches('-').chars().next().unwrap_or('?');
                    CliError::Getopt(format!("option requires an argument -- '{c}'"), verb)
                }
            }
            _ => {
                let text = e.to_string();
                let first = text
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("error: ")
                    .to_string();
                CliError::Getopt(first, verb)
            }
        }
    })
}

/// Options shared by verbs that open one image.
#[derive(Args, Debug, Clone, Default)]
pub struct Common {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Open in shared mode for concurrent access (no conflicting locks).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Output format: human or json.
    #[arg(long = "output", value_name = "human|json")]
    pub output: Option<String>,
}

/// `info`
#[derive(Parser, Debug)]
#[command(
    about = "Display information about an image",
    disable_version_flag = true
)]
pub struct InfoArgs {
    #[command(flatten)]
    pub common: Common,
    /// Display information about the whole backing chain.
    #[arg(short = 'b', long = "backing-chain")]
    pub backing_chain: bool,
    /// Treat FILENAME as an image specification.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// QEMU user-creatable object (accepted and ignored).
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// Image file names.
    #[arg(allow_hyphen_values = false)]
    pub files: Vec<String>,
}

/// `create`
#[derive(Parser, Debug)]
#[command(
    about = "Create and format a new image file",
    disable_version_flag = true
)]
pub struct CreateArgs {
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Format of the new image (default raw).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Format-specific options (`-o help` lists them).
    #[arg(short = 'o', long = "options", value_name = "FMT_OPTS")]
    pub options: Vec<String>,
    /// Backing file.
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILENAME")]
    pub backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    pub backing_format: Option<String>,
    /// Do not open the backing file.
    #[arg(short = 'u', long = "backing-unsafe")]
    pub unsafe_backing: bool,
    /// QEMU user-creatable object (accepted and ignored).
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// FILENAME [SIZE]
    pub rest: Vec<String>,
}

/// `convert`
#[derive(Parser, Debug)]
#[command(
    about = "Copy an image to another with optional format conversion",
    disable_version_flag = true
)]
pub struct ConvertArgs {
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Show progress: `--progress` (or `=text`) as `-p`, `--progress=json` for JSON lines on
    /// stdout (diskit extension; qemu-img's `--progress` takes no value).
    #[arg(
        long = "progress",
        value_name = "text|json",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "text"
    )]
    pub progress_mode: Option<String>,
    /// Progress as JSON lines on stdout (alias of `--progress=json`).
    #[arg(long = "progress-json")]
    pub progress_json: bool,
    /// Source format.
    #[arg(
        short = 'f',
        long = "source-format",
        value_name = "SRC_FMT",
        allow_hyphen_values = true
    )]
    pub format: Option<String>,
    /// Treat sources as image specifications.
    #[arg(long = "source-image-opts", alias = "image-opts")]
    pub image_opts: bool,
    /// Source snapshot (`snapshot.id=...,snapshot.name=...` or a name).
    #[arg(
        short = 'l',
        long = "source-snapshot",
        value_name = "SNAPSHOT_PARAMS",
        allow_hyphen_values = true
    )]
    pub snapshot_params: Option<String>,
    /// Source snapshot (deprecated form).
    #[arg(short = 's', value_name = "SNAPSHOT", allow_hyphen_values = true)]
    pub snapshot: Option<String>,
    /// Source cache mode.
    #[arg(
        short = 'T',
        long = "source-cache",
        value_name = "SRC_CACHE",
        allow_hyphen_values = true
    )]
    pub src_cache: Option<String>,
    /// Target format (default raw).
    #[arg(
        short = 'O',
        long = "target-format",
        value_name = "TGT_FMT",
        allow_hyphen_values = true
    )]
    pub target_format: Option<String>,
    /// Target is an image specification.
    #[arg(long = "target-image-opts")]
    pub target_image_opts: bool,
    /// Target format options.
    #[arg(
        short = 'o',
        long = "target-options",
        value_name = "TGT_OPTS",
        allow_hyphen_values = true
    )]
    pub options: Vec<String>,
    /// Compress the target.
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Target cache mode.
    #[arg(
        short = 't',
        long = "target-cache",
        value_name = "TGT_CACHE",
        allow_hyphen_values = true
    )]
    pub tgt_cache: Option<String>,
    /// Backing file of the target.
    #[arg(
        short = 'B',
        long = "backing",
        value_name = "BACKING_FILENAME",
        allow_hyphen_values = true
    )]
    pub backing: Option<String>,
    /// Backing file format.
    #[arg(
        short = 'F',
        long = "backing-format",
        value_name = "BACKING_FMT",
        allow_hyphen_values = true
    )]
    pub backing_format: Option<String>,
    /// Do not create the target.
    #[arg(short = 'n', long = "no-create")]
    pub no_create: bool,
    /// The target reads as zero already.
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Minimum run of zeroes to leave unallocated.
    #[arg(
        short = 'S',
        long = "sparse-size",
        value_name = "SPARSE_SIZE",
        allow_hyphen_values = true
    )]
    pub sparse_size: Option<String>,
    /// Copy persistent bitmaps.
    #[arg(long = "bitmaps")]
    pub bitmaps: bool,
    /// Skip broken bitmaps.
    #[arg(long = "skip-broken-bitmaps")]
    pub skip_broken_bitmaps: bool,
    /// Shared mode.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Rate limit in bytes per second.
    #[arg(
        short = 'r',
        long = "rate",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    pub rate: Option<String>,
    /// Parallel workers (1 to 16).
    #[arg(
        short = 'm',
        long = "parallel",
        value_name = "NUM",
        allow_hyphen_values = true
    )]
    pub parallel: Option<String>,
    /// copy_file_range offloading.
    #[arg(short = 'C', long = "copy-range-offloading")]
    pub copy_range: bool,
    /// Treat read errors as zeroes.
    #[arg(long = "salvage")]
    pub salvage: bool,
    /// Out-of-order writes.
    #[arg(short = 'W', long = "oob-writes")]
    pub oob_writes: bool,
    /// QEMU user-creatable object (accepted and ignored).
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// SRC_FILENAME... TGT_FILENAME
    pub files: Vec<String>,
}

/// `map`
#[derive(Parser, Debug)]
#[command(
    about = "Dump the allocation map of an image",
    disable_version_flag = true
)]
pub struct MapArgs {
    #[command(flatten)]
    pub common: Common,
    /// Treat FILENAME as an image specification.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// QEMU user-creatable object (accepted and ignored).
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// First guest offset to map.
    #[arg(short = 's', long = "start-offset", value_name = "OFFSET")]
    pub start_offset: Option<String>,
    /// Bytes to map.
    #[arg(short = 'l', long = "max-length", value_name = "LENGTH")]
    pub max_length: Option<String>,
    /// Image file name.
    pub files: Vec<String>,
}

/// `compare`
#[derive(Parser, Debug)]
#[command(
    about = "Check whether two images have the same content",
    disable_version_flag = true
)]
pub struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f', value_name = "FMT")]
    pub format1: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F', value_name = "FMT")]
    pub format2: Option<String>,
    /// Cache mode.
    #[arg(short = 'T', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Strict: sizes and allocation must match too.
    #[arg(short = 's', long = "strict")]
    pub strict: bool,
    /// Shared mode.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Treat file names as image specifications.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// QEMU user-creatable object (accepted and ignored).
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// FILENAME1 FILENAME2
    pub files: Vec<String>,
}

/// `resize` (the size, the last argument, is taken off before parsing)
#[derive(Parser, Debug)]
#[command(
    about = "Change the virtual size of an image",
    disable_version_flag = true
)]
pub struct ResizeArgs {
    /// Image format.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Preallocation of the new part (off, metadata, falloc, full).
    #[arg(long = "preallocation", value_name = "PREALLOC")]
    pub preallocation: Option<String>,
    /// Allow shrinking.
    #[arg(long = "shrink")]
    pub shrink: bool,
    /// Treat FILENAME as an image specification.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// QEMU user-creatable object (accepted and ignored).
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// FILENAME
    pub files: Vec<String>,
}

/// `dd`
#[derive(Parser, Debug)]
#[command(
    about = "Copy from input to output, dd style",
    disable_version_flag = true
)]
pub struct DdArgs {
    /// Input format.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output format (default raw).
    #[arg(short = 'O', long = "output-format", value_name = "OUTPUT_FMT")]
    pub output_format: Option<String>,
    /// Shared mode.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Treat the input as an image specification.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// QEMU user-creatable object (accepted and ignored).
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// Operands: if=, of=, bs=, count=, skip=
    pub operands: Vec<String>,
}

/// `check`
#[derive(Parser, Debug)]
#[command(
    about = "Check an image for consistency, and repair it",
    disable_version_flag = true
)]
pub struct CheckArgs {
    #[command(flatten)]
    pub common: Common,
    /// Repair: leaks or all.
    #[arg(short = 'r', long = "repair", value_name = "leaks|all")]
    pub repair: Option<String>,
    /// Cache mode.
    #[arg(short = 'T', long = "cache", value_name = "CACHE_MODE")]
    pub cache: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Treat FILENAME as an image specification.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// QEMU user-creatable object (accepted and ignored).
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// FILENAME
    pub files: Vec<String>,
}

/// `measure`
#[derive(Parser, Debug)]
#[command(
    about = "Calculate the file size needed for a new image",
    disable_version_flag = true
)]
pub struct MeasureArgs {
    #[command(flatten)]
    pub common: Common,
    /// Target format options.
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Target format (default raw).
    #[arg(short = 'O', long = "target-format", value_name = "OUTPUT_FMT")]
    pub target_format: Option<String>,
    /// Size of a new image instead of a source.
    #[arg(long = "size", value_name = "SIZE")]
    pub size: Option<String>,
    /// Source snapshot.
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT_PARAM")]
    pub snapshot: Option<String>,
    /// Treat FILENAME as an image specification.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// QEMU user-creatable object (accepted and ignored).
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// FILENAME
    pub files: Vec<String>,
}

/// `compact` (diskit extension)
#[derive(Parser, Debug)]
#[command(about = "Shrink an image in place (vdi)", disable_version_flag = true)]
pub struct CompactArgs {
    /// Image format.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// FILENAME
    pub files: Vec<String>,
}
