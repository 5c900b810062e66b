//! A cheap test for data that deflate cannot shrink (already compressed or encrypted data),
//! so that the compressing writers store it as it is instead of spending a deflate run
//! (the slowest step of `convert -c`) on it.
//!
//! Deflate shrinks data in two ways only: Huffman codes for unevenly used byte values, and
//! back-references to earlier repeats within its window. The test looks for both, at well
//! under a tenth of deflate's cost: the byte histogram of every 16 KiB (deflate's blocks are
//! that long, so a mix of two kinds of data shows in them) must be within 0.3% of 8 bits of
//! Shannon entropy per byte (random 16 KiB has 0.14% less than 8 bits: the sample is finite),
//! and under 1 in 512 positions may start a 4-byte repeat of the last 4 bytes that hashed
//! alike within the window. Data that passes gains under about half a percent from deflate,
//! which it rarely reaches: on 4000 clusters of system libraries, text and binaries the
//! skipped clusters would have been 8 bytes smaller in all, on already-compressed files 0.

/// Histogram block: one deflate block's worth of literals.
const BLOCK: usize = 16 * 1024;

/// How far below 8 bits per byte a block's entropy may be (a fraction of 8 bits).
const ENTROPY_SLACK: f64 = 0.003;

/// True when deflate (with a `window`-byte window) would not make `data` meaningfully
/// smaller. Pieces shorter than 16 KiB, or not a multiple of it, are always worth a try.
pub fn looks_incompressible(data: &[u8], window: usize) -> bool {
    if data.len() < BLOCK || data.len() % BLOCK != 0 {
        return false;
    }
    data.chunks_exact(BLOCK).all(high_entropy) && few_repeats(data, window)
}

fn high_entropy(block: &[u8]) -> bool {
    // four histograms: consecutive equal bytes do not wait on each other's increments
    let mut h = [[0u32; 256]; 4];
    for q in block.chunks_exact(4) {
        h[0][q[0] as usize] += 1;
        h[1][q[1] as usize] += 1;
        h[2][q[2] as usize] += 1;
        h[3][q[3] as usize] += 1;
    }
    let n = block.len() as f64;
    let bits: f64 = (0..256)
        .map(|b| (h[0][b] + h[1][b] + h[2][b] + h[3][b]) as f64)
        .filter(|&c| c > 0.0)
        .map(|c| c * (n / c).log2())
        .sum();
    bits >= n * 8.0 * (1.0 - ENTROPY_SLACK)
}

fn few_repeats(data: &[u8], window: usize) -> bool {
    const HASH_BITS: u32 = 12;
    // 1 + the last position of each hash (0: none yet)
    let mut last = [0u32; 1 << HASH_BITS];
    let limit = data.len() / 512;
    let mut hits = 0usize;
    let mut i = 0;
    while i + 8 <= data.len() {
        let word = u64::from_le_bytes(data[i..i + 8].try_into().expect("8 bytes"));
        for k in 0..4 {
            let v = (word >> (8 * k)) as u32;
            let p = i + k;
            let slot = (v.wrapping_mul(0x9E37_79B1) >> (32 - HASH_BITS)) as usize;
            let cand = std::mem::replace(&mut last[slot], p as u32 + 1) as usize;
            // branch-free: in random data the distance test is a coin toss
            let c = cand.saturating_sub(1);
            let same = u32::from_le_bytes(data[c..c + 4].try_into().expect("4 bytes")) == v;
            hits += ((cand != 0) & (p + 1 - cand <= window) & same) as usize;
        }
        if hits > limit {
            return false;
        }
        i += 4;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn random_data_is_incompressible() {
        for seed in 1..20 {
            assert!(
                looks_incompressible(&noise(65536, seed), 4096),
                "seed {seed}"
            );
        }
        assert!(looks_incompressible(&noise(2 << 20, 7), 32768));
    }

    #[test]
    fn redundancy_of_either_kind_is_seen() {
        // too small to judge
        assert!(!looks_incompressible(&noise(8192, 3), 4096));
        // text: uneven byte values
        let text = b"the quick brown fox jumps over the lazy dog\n".repeat(1500);
        assert!(!looks_incompressible(&text[..65536], 4096));
        // half random, half zero: the zero half's histogram
        let mut half = noise(65536, 5);
        half[32768..].fill(0);
        assert!(!looks_incompressible(&half, 4096));
        // two halves with disjoint byte values: the whole histogram is flat, each block's not
        let mut split: Vec<u8> = noise(65536, 9);
        for (i, b) in split.iter_mut().enumerate() {
            *b = if i < 32768 { *b & 0x7f } else { *b | 0x80 };
        }
        assert!(!looks_incompressible(&split, 4096));
        // random 1 KiB repeated: flat histograms, but repeats within the window
        let piece = noise(1024, 11);
        let rep: Vec<u8> = piece.iter().copied().cycle().take(65536).collect();
        assert!(!looks_incompressible(&rep, 4096));
        // random 8 KiB repeated: beyond a 4 KiB window, within a 32 KiB one
        let piece = noise(8192, 13);
        let rep: Vec<u8> = piece.iter().copied().cycle().take(65536).collect();
        assert!(looks_incompressible(&rep, 4096));
        assert!(!looks_incompressible(&rep, 32768));
    }
}
