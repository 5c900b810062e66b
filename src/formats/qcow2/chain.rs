//! Backing-chain maintenance of a qcow2 image: emptying the active layer (after `commit`)
//! and rewriting the backing file reference (`rebase`).
//!
//! Both are ordered so that an interruption leaves a valid image:
//! - emptying first writes a zeroed L1 table (the image now reads through to its backing
//!   file), and only then drops the refcounts of the L2 tables and data clusters the old
//!   table reached: a crash in between leaks clusters, which `check -r leaks` reclaims;
//! - the backing reference is changed by rewriting the header cluster last, after every
//!   data and metadata write is durable.

use super::header::Header;
use super::{Qcow2, L1E_OFFSET_MASK};
use crate::error::{Error, Result};

/// The longest backing file name qcow2 stores (QEMU's limit).
const MAX_BACKING_NAME: usize = crate::limits::QCOW2_MAX_BACKING_NAME;

impl Qcow2 {
    /// Drops every L1 entry of the active table and frees what they referenced.
    pub(crate) fn make_empty_impl(&self) -> Result<()> {
        let mut m = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        if m.l1.iter().all(|e| e & L1E_OFFSET_MASK == 0) {
            return Ok(());
        }
        self.start_write(&mut m)?;
        // Everything written so far is durable and the L2 cache is clean.
        self.flush_meta(&mut m)?;
        self.invalidate_ccache();

        let l1 = m.l1.clone();
        let mut frees: Vec<u64> = Vec::new();
        let mut tables: Vec<u64> = Vec::new();
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            // Loads (and validates) the table through the usual path.
            match self.l2_table_for_read(&mut m, i as u64)? {
                Some(off) if off == l2 => {}
                _ => continue,
            }
            for (w, _) in self.l2_entries_of(&mut m, l2)? {
                if let Some((first, n)) = self.entry_clusters(w) {
                    frees.extend(first..first + n);
                }
            }
            tables.push(l2);
            frees.push(l2 >> self.cluster_bits);
        }

        // 1. The image reads as empty once the zeroed L1 table is on disk.
        for e in m.l1.iter_mut() {
            *e = 0;
        }
        for &t in &tables {
            m.l2.forget(t);
        }
        m.l1_dirty = true;
        m.changed = true;
        self.write_l1(&mut m)?;
        self.file.sync()?;

        // 2. Then the references go (shared clusters keep the snapshots' references).
        m.ctail = None;
        for &c in &frees {
            self.update_refcount(&mut m, c, -1)?;
        }
        self.write_dirty_refblocks(&mut m)?;
        self.file.sync()?;
        m.changed = false;

        // 3. Give the space back: cut a free tail, punch what is free now.
        let flen = self.file.len()?;
        let last = self.last_used_cluster(&mut m, flen.div_ceil(self.cs))?;
        if let Some(last) = last {
            let end = (last + 1) * self.cs;
            if end < flen {
                self.file.set_len(end)?;
                m.end = last + 1;
                if m.free_hint > m.end {
                    m.free_hint = m.end;
                }
            }
        }
        self.punch_freed(&mut m, frees)?;
        Ok(())
    }

    /// Rewrites the backing file name and the backing format extension, keeping every
    /// other header field and extension.
    pub(crate) fn set_backing_file_impl(
        &self,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<()> {
        if !self.writable {
            return Err(Error::unsupported(format!(
                "{}: the image is open read-only",
                self.filename
            )));
        }
        if format.is_some() && name.is_none() {
            return Err(Error::invalid_arg("Invalid argument"));
        }
        if let Some(n) = name {
            let raw_data = {
                let m = self.meta.lock().unwrap_or_else(|e| e.into_inner());
                self.has_data_file && m.autoclear & super::header::AUTOCLEAR_DATA_FILE_RAW != 0
            };
            // The external data file alone would no longer describe the guest.
            if raw_data || n.len() > MAX_BACKING_NAME {
                return Err(Error::invalid_arg("Invalid argument"));
            }
        }
        let mut m = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        // Data and metadata first: the header goes last.
        self.flush_meta(&mut m)?;
        let mut h = Header::read(&self.file)?;
        if h.has_crypto_ext {
            return Err(Error::unsupported("Operation not supported"));
        }
        h.incompatible = m.incompat;
        h.autoclear = m.autoclear;
        h.backing_file = name.map(str::to_string);
        h.backing_format = match name {
            Some(_) => format.map(str::to_string),
            None => None,
        };
        if h.backing_file.is_none() {
            h.backing_file_offset = 0;
            h.backing_file_size = 0;
        }
        let buf = h
            .serialize()
            .map_err(|_| Error::too_large("No space left in the file header"))?;
        self.file.write_at(&buf, 0)?;
        self.file.sync()
    }
}
