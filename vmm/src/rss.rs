//! The VMM's own memory: resident set size without the guest RAM it holds.

/// Resident KiB of this process outside the host ranges `guest` (start, len)
/// that back guest RAM. `smaps` is the text of /proc/self/smaps.
pub fn outside(smaps: &str, guest: &[(u64, u64)]) -> u64 {
    let mut in_guest = false;
    let mut total = 0;
    for line in smaps.lines() {
        if let Some(start) = mapping_start(line) {
            in_guest = guest
                .iter()
                .any(|&(base, len)| (base..base + len).contains(&start));
        } else if let Some(value) = line.strip_prefix("Rss:") {
            if !in_guest {
                total += kib(value).unwrap_or(0);
            }
        }
    }
    total
}

/// A /proc size value (`   1234 kB`) in KiB.
pub fn kib(value: &str) -> Option<u64> {
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// The mappings of at least `len` bytes in `smaps`: how another VMM's guest
/// RAM shows, whose layout we do not know.
pub fn mappings_of_at_least(smaps: &str, len: u64) -> Vec<(u64, u64)> {
    smaps
        .lines()
        .filter_map(mapping_range)
        .filter(|&(start, end)| end - start >= len)
        .map(|(start, end)| (start, end - start))
        .collect()
}

/// The start address of a mapping header line (`start-end perms ...`).
fn mapping_start(line: &str) -> Option<u64> {
    mapping_range(line).map(|(start, _)| start)
}

/// The address range of a mapping header line.
fn mapping_range(line: &str) -> Option<(u64, u64)> {
    let (range, _) = line.split_once(' ')?;
    let (start, end) = range.split_once('-')?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let start = u64::from_str_radix(start, 16).ok()?;
    (start <= end).then_some((start, end))
}

/// This process's resident KiB outside guest memory, if /proc says.
pub fn vmm_rss_kib(guest: &[(u64, u64)]) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    Some(outside(&smaps, guest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtracts_guest_mappings() {
        let smaps = "\
55d0a000-55d0b000 r-xp 00000000 08:01 123 /usr/bin/uvm
Size:                  4 kB
Rss:                   4 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Rss:               65536 kB
Pss:               65536 kB
7ffd0000-7ffd2000 rw-p 00000000 00:00 0 [stack]
Rss:                   8 kB
";
        assert_eq!(outside(smaps, &[(0x7f00_0000_0000, 128 << 20)]), 12);
        assert_eq!(outside(smaps, &[]), 65548);
        let large = mappings_of_at_least(smaps, 64 << 20);
        assert_eq!(large, [(0x7f00_0000_0000, 128 << 20)]);
        assert_eq!(outside(smaps, &large), 12);
    }
}
