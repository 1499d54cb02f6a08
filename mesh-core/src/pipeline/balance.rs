//! Which blocks a new server should take when not told: the ones the mesh serves worst
//! (Petals' load-balancing rule), so every server added raises the weakest link.

use crate::types::BlockRange;

/// Throughput each block of a `num_blocks` model gets from `servers` (span, tokens/s per
/// block). A server that has not measured its speed yet counts as 1.
pub fn block_coverage(servers: &[(BlockRange, f32)], num_blocks: u32) -> Vec<f32> {
    let mut coverage = vec![0.0; num_blocks as usize];
    for (span, tps) in servers {
        let weight = if *tps > 0.0 { *tps } else { 1.0 };
        for b in span.start..span.end.min(num_blocks) {
            coverage[b as usize] += weight;
        }
    }
    coverage
}

/// The window of `len` blocks whose coverage, sorted ascending, is smallest (compared
/// lexicographically): first the window holding the least-served block, then ties broken
/// by the next weakest block, then by position.
pub fn choose_span(coverage: &[f32], len: u32) -> Option<BlockRange> {
    let n = coverage.len() as u32;
    if len == 0 || len > n {
        return None;
    }
    (0..=n - len)
        .map(|start| {
            let mut window: Vec<f32> = coverage[start as usize..(start + len) as usize].to_vec();
            window.sort_by(f32::total_cmp);
            (window, start)
        })
        .min_by(|(a, sa), (b, sb)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| x.total_cmp(y))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(sa.cmp(sb))
        })
        .map(|(_, start)| BlockRange::new(start, start + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_mesh_starts_at_block_zero() {
        let cov = block_coverage(&[], 8);
        assert_eq!(choose_span(&cov, 3), Some(BlockRange::new(0, 3)));
    }

    #[test]
    fn takes_the_gap() {
        let servers = [(BlockRange::new(0, 3), 10.0), (BlockRange::new(6, 8), 10.0)];
        let cov = block_coverage(&servers, 8);
        assert_eq!(choose_span(&cov, 3), Some(BlockRange::new(3, 6)));
    }

    #[test]
    fn prefers_the_slowest_blocks() {
        let servers = [(BlockRange::new(0, 4), 100.0), (BlockRange::new(4, 8), 5.0)];
        let cov = block_coverage(&servers, 8);
        assert_eq!(choose_span(&cov, 4), Some(BlockRange::new(4, 8)));
        assert_eq!(choose_span(&cov, 9), None);
    }
}
