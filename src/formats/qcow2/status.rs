//! Block status refinements QEMU makes for qcow2.
//!
//! When an image looks metadata-preallocated (far more clusters are referenced than the
//! host file really has allocated), QEMU asks the host file about data clusters too: parts
//! that are holes, or past the end of the file, are reported as zero. `qemu-img map` then
//! prints `"zero": true, "data": true` for them. This reproduces that decision.

use super::Qcow2;
use crate::error::Result;

impl Qcow2 {
    /// QEMU's metadata-preallocation heuristic: at least max(real*10/9, real+2) clusters
    /// referenced, where `real` is the number of clusters the host really allocated.
    fn metadata_preallocated(&self) -> Result<bool> {
        if let Some(v) = self.prealloc_meta.get() {
            return Ok(*v);
        }
        let file_len = self.file.len()?;
        let real_clusters = self.file.allocated_size()? / self.cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = file_len.div_ceil(self.cs);
        let mut count = 0u64;
        {
            let mut m = self.meta.lock().unwrap_or_else(|e| e.into_inner());
            let mut i = 0u64;
            while i < end_cluster && count < threshold {
                // An unreadable refcount makes QEMU give up on the heuristic.
                match self.refcount(&mut m, i) {
                    Ok(r) => count += u64::from(r > 0),
                    Err(_) => {
                        count = 0;
                        break;
                    }
                }
                i += 1;
            }
        }
        let v = count >= threshold;
        let _ = self.prealloc_meta.set(v);
        Ok(v)
    }

    /// For a data run at `host_offset`: `Some((zero, len))` where QEMU would consult the
    /// host file, `None` where it would not.
    pub(crate) fn host_status(&self, host_offset: u64, len: u64) -> Result<Option<(bool, u64)>> {
        if len == 0 || !self.metadata_preallocated()? {
            return Ok(None);
        }
        Ok(Some(self.data()?.hole_status(host_offset, len)?))
    }
}
