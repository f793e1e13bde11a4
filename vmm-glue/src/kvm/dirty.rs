//! Turning KVM's dirty log (one bit per 4 KiB page) into the migration's page set.

use rdmig_transport::mem::{PageIndex, RegionId};
use rdmig_transport::pages::PageSet;

/// ORs a 4 KiB-page bitmap into a set of pages `1 << fold` times larger.
pub fn fold_into(into: &mut PageSet, region: RegionId, words: &[u64], fold: u32) {
    for (w, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            into.insert(region, PageIndex(((w as u64) * 64 + b) >> fold));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_maps_small_pages_to_large() {
        let mut s = PageSet::with_pages(vec![4]);
        fold_into(&mut s, RegionId(0), &[1 | (1 << 63), 1 << 2], 9); // 2 MiB pages
        assert!(s.contains(RegionId(0), PageIndex(0)));
        assert_eq!(s.count(), 1);
        let mut s = PageSet::with_pages(vec![200]);
        fold_into(
            &mut s,
            RegionId(0),
            &[0b1000_0001, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            2,
        );
        assert_eq!(
            (0..200)
                .filter(|&p| s.contains(RegionId(0), PageIndex(p)))
                .collect::<Vec<_>>(),
            vec![0, 1, 144]
        );
    }
}
