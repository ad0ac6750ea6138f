//! Order statistics for the benchmark programs (vmm-node's and `tests/`'s): one
//! nearest-rank definition of a percentile for every printed p50/p99.

use std::cmp::Ordering;

/// The `p` quantile (0.0..=1.0, nearest rank: index `round((n - 1) × p)`) of `v`, which is
/// sorted in place; `None` for an empty sample. Values that do not compare (NaN) sort as
/// equal to their neighbours.
pub fn percentile<T: Copy + PartialOrd>(v: &mut [T], p: f64) -> Option<T> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(Ordering::Equal));
    let i = ((v.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize;
    v.get(i.min(v.len() - 1)).copied()
}

/// [`percentile`] 0.5.
pub fn median<T: Copy + PartialOrd>(v: &mut [T]) -> Option<T> {
    percentile(v, 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_on_odd_even_and_empty_samples() {
        assert_eq!(median(&mut [3u64, 1, 2]), Some(2));
        assert_eq!(median(&mut [4u64, 1, 3, 2]), Some(3));
        assert_eq!(percentile(&mut [5u64, 1, 4, 2, 3], 0.99), Some(5));
        assert_eq!(percentile(&mut [5u64, 1], 0.0), Some(1));
        assert_eq!(median::<u64>(&mut []), None);
        assert_eq!(median(&mut [2.5f64, 0.5, 1.0]), Some(1.0));
    }
}
