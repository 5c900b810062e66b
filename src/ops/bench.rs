//! `bench`: a simple I/O benchmark (sequential requests spread over a pool of workers).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::formats::{self, BlockDriver, Format, OpenOptions};

/// Options of `bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// `-f`
    pub format: Option<Format>,
    /// `-c`: number of requests.
    pub count: u64,
    /// `-d`: requests in flight (workers).
    pub depth: u64,
    /// `-o`: offset of the first request.
    pub offset: u64,
    /// `-s`: bytes per request.
    pub buf_size: u64,
    /// `-S`: distance between requests (0 = `buf_size`).
    pub step: u64,
    /// `-w`
    pub write: bool,
    /// `--pattern`: the byte written.
    pub pattern: u8,
    /// `--flush-interval` (0 = none).
    pub flush_interval: u64,
    /// Not `--no-drain`: wait for the requests in flight before each flush.
    pub drain: bool,
    /// `-t none|directsync`: O_DIRECT.
    pub direct: bool,
    /// `-t writethrough|directsync`: flush after every write.
    pub writethrough: bool,
    /// `-U`
    pub force_share: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            format: None,
            count: 75000,
            depth: 64,
            offset: 0,
            buf_size: 4096,
            step: 0,
            write: false,
            pattern: 0,
            flush_interval: 0,
            drain: true,
            direct: false,
            writethrough: false,
            force_share: false,
        }
    }
}

/// The most worker threads we start, whatever the depth.
const MAX_WORKERS: u64 = 256;

/// An opened benchmark, ready to run.
pub struct Bench {
    img: Box<dyn BlockDriver>,
    opts: BenchOptions,
}

impl Bench {
    /// Opens the image.
    pub fn open(filename: &str, opts: &BenchOptions) -> Result<Bench> {
        if opts.write && opts.force_share {
            return Err(Error::invalid_arg(format!(
                "Could not open '{filename}': force-share=on can only be used with read-only images"
            )));
        }
        let img = formats::open(
            filename,
            &OpenOptions {
                format: opts.format,
                write: opts.write,
                force_share: opts.force_share,
                direct: opts.direct,
                ..OpenOptions::default()
            },
        )?;
        Ok(Bench {
            img,
            opts: opts.clone(),
        })
    }

    /// The step used (`-S`, else the buffer size).
    pub fn step(&self) -> u64 {
        if self.opts.step == 0 {
            self.opts.buf_size
        } else {
            self.opts.step
        }
    }

    /// Offset of request `k` (the first at `-o`, then stepping, wrapping at the image end).
    fn offset_of(&self, k: u64) -> u64 {
        if k == 0 {
            return self.opts.offset;
        }
        let size = self.img.virtual_size();
        if size == 0 {
            return 0;
        }
        ((self.opts.offset as u128 + k as u128 * self.step() as u128) % size as u128) as u64
    }

    fn request(&self, buf: &mut [u8], k: u64) -> Result<()> {
        let off = self.offset_of(k);
        let size = self.img.virtual_size();
        if off.checked_add(buf.len() as u64).is_none_or(|e| e > size) {
            return Err(Error::out_of_bounds("Input/output error"));
        }
        if self.opts.write {
            self.img.write_at(buf, off)?;
            if self.opts.writethrough {
                self.img.flush()?;
            }
            Ok(())
        } else {
            self.img.read_at(buf, off)
        }
    }

    /// Runs requests `from..to` on the workers.
    fn run_batch(&self, from: u64, to: u64, flush_each: u64) -> Result<()> {
        let next = AtomicU64::new(from);
        let done = AtomicU64::new(0);
        let err: Mutex<Option<Error>> = Mutex::new(None);
        let workers = self.opts.depth.min(to - from).clamp(1, MAX_WORKERS);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    let mut buf = vec![self.opts.pattern; self.opts.buf_size as usize];
                    loop {
                        if err.lock().map(|e| e.is_some()).unwrap_or(true) {
                            return;
                        }
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= to {
                            return;
                        }
                        let mut r = self.request(&mut buf, k);
                        if r.is_ok() && flush_each > 0 {
                            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                            if n % flush_each == 0 {
                                r = self.img.flush();
                            }
                        }
                        if let Err(e) = r {
                            if let Ok(mut g) = err.lock() {
                                g.get_or_insert(e);
                            }
                            return;
                        }
                    }
                });
            }
        });
        match err.into_inner().ok().flatten() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs the benchmark; returns its duration.
    pub fn run(&self) -> Result<Duration> {
        let t = Instant::now();
        let count = self.opts.count;
        let fi = self.opts.flush_interval;
        if fi == 0 || !self.opts.write {
            self.run_batch(0, count, 0)?;
        } else if !self.opts.drain {
            self.run_batch(0, count, fi)?;
        } else {
            // drain: the requests in flight finish, then the flush runs alone
            let mut issued = 0;
            while issued < count {
                let remaining = count - issued;
                let batch = match remaining % fi {
                    0 => fi,
                    r => r,
                };
                self.run_batch(issued, issued + batch, 0)?;
                issued += batch;
                self.img.flush()?;
            }
        }
        Ok(t.elapsed())
    }

    /// Closes the image.
    pub fn close(self) -> Result<()> {
        self.img.close()
    }
}
