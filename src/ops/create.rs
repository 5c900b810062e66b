//! `create`: a new image from a format, `-o` options and a size.

use crate::error::{Error, Result};
use crate::formats::{self, CreateOpts, Format, OpenOptions};

/// Everything `qemu-img create` takes.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// The new image's name.
    pub filename: String,
    /// Its format (`-f`, default raw).
    pub format: Format,
    /// `-o` options (merged).
    pub options: CreateOpts,
    /// The size argument, if given.
    pub size: Option<u64>,
    /// `-u`: do not open the backing file (the size must be given).
    pub unsafe_backing: bool,
}

impl CreateRequest {
    /// Folds the size argument and checks the options; fills `size` from the backing image
    /// when needed. Returns the final options.
    pub fn resolve(&self) -> Result<CreateOpts> {
        let name = &self.filename;
        let mut opts = self.options.clone();
        opts.set_unsafe_backing(self.unsafe_backing);
        if let Some(size) = self.size {
            opts.set("size", &size.to_string());
        }
        let supports_backing = formats::create_options(self.format)
            .iter()
            .any(|d| d.name == "backing_file");
        if opts.get("backing_file").is_some() && !supports_backing {
            return Err(Error::invalid_arg(format!(
                "{name}: Backing file not supported for file format '{}'",
                self.format
            )));
        }
        for (k, _) in opts.iter() {
            let known = formats::create_options(self.format)
                .iter()
                .chain(formats::raw::PROTOCOL_OPTS)
                .any(|d| d.name == k);
            if !known {
                return Err(Error::invalid_arg(format!(
                    "{name}: Invalid parameter '{k}'"
                )));
            }
        }
        let Some(backing) = opts.get("backing_file").map(str::to_string) else {
            return Ok(opts);
        };
        if !formats::create_options(self.format)
            .iter()
            .any(|d| d.name == "backing_file")
        {
            return Err(Error::invalid_arg(format!(
                "{name}: Backing file not supported for file format '{}'",
                self.format
            )));
        }
        if backing == *name {
            return Err(Error::invalid_arg(format!(
                "{name}: Error: Trying to create an image with the same filename as the backing file"
            )));
        }
        let full = formats::resolve_backing_name(name, &backing);
        let fmt = match opts.get("backing_fmt") {
            Some(f) => Some(Format::from_name(f).map_err(|e| e.context(name))?),
            None => None,
        };
        let needs_open = !self.unsafe_backing;
        let o = OpenOptions {
            format: fmt,
            no_backing: true,
            no_io: true,
            force_share: true,
            ..OpenOptions::default()
        };
        let opened = if needs_open {
            Some(formats::open(&full, &o))
        } else {
            None
        };
        // a backing file that does not open is reported first, format or not
        if fmt.is_none() && !matches!(opened, Some(Err(_))) {
            let mut msg = format!("{name}: Backing file specified without backing format");
            if let Some(Ok(img)) = &opened {
                msg.push_str(&format!("\nDetected format of {}.", img.format()));
            }
            return Err(Error::invalid_arg(msg));
        }
        match opened {
            Some(Ok(img)) if opts.get("size").is_none() => {
                opts.set("size", &img.virtual_size().to_string());
            }
            Some(Err(e)) if needs_open => {
                let msg = e
                    .message()
                    .strip_prefix(&format!("Could not open '{full}': "))
                    .unwrap_or(e.message())
                    .to_string();
                return Err(e.with_message(format!("{name}: {msg}\nCould not open backing image.")));
            }
            _ => {}
        }
        Ok(opts)
    }

    /// The `Formatting 'name', fmt=...` line qemu-img prints before creating.
    pub fn formatting_line(&self, opts: &CreateOpts) -> String {
        format!(
            "Formatting '{}', {}",
            self.filename,
            formats::create_summary(self.format, opts)
        )
    }

    /// Creates the image with resolved options.
    pub fn run(&self, opts: &CreateOpts) -> Result<()> {
        formats::create(&self.filename, self.format, opts)
    }
}
