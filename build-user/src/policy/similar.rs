//! "Did you mean …?" for near-miss keys and values.
//!
//! Edit distance is written here rather than taken from `strsim` because it is a
//! dozen lines and build-user does not otherwise depend on that crate.

/// Levenshtein distance between two strings, by characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // One row of the dynamic-programming table, reused.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The candidate closest to `word`, if it is close enough to be what was meant:
/// a small edit distance (typos, transpositions count as two), or one being a
/// prefix of the other (`own-files` → `own`, `loop` → `loopback`).
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let word_lower = word.to_ascii_lowercase();
    let limit = (word.chars().count() / 3).max(2);
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        let candidate_lower = candidate.to_ascii_lowercase();
        let d = distance(&word_lower, &candidate_lower);
        let prefix = word_lower.len() >= 3
            && candidate.len() >= 3
            && (word_lower.starts_with(&candidate_lower)
                || candidate_lower.starts_with(&word_lower));
        if d <= limit || prefix {
            // A prefix match ranks like distance 1: weaker than an exact-case fix.
            let score = if prefix { d.min(1) } else { d };
            if best.is_none_or(|(s, _)| score < s) {
                best = Some((score, candidate));
            }
        }
    }
    best.map(|(_, c)| c)
}

/// `a, b, c` with each name in backticks: the list printed after "expected one of".
pub(crate) fn list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_counts_edits() {
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("write", "write"), 0);
        assert_eq!(distance("netwrok", "network"), 2);
    }

    #[test]
    fn closest_finds_near_misses_only() {
        let keys = ["network", "write", "families", "action"];
        assert_eq!(closest("writes", keys), Some("write"));
        assert_eq!(closest("netwrok", keys), Some("network"));
        assert_eq!(closest("Network", keys), Some("network"));
        assert_eq!(closest("banana", keys), None);
        assert_eq!(closest("TRE", ["TREE", "HOME"]), Some("TREE"));
        assert_eq!(
            closest("own-files", ["tree", "own", "device", "file"]),
            Some("own")
        );
        assert_eq!(
            closest("loop", ["none", "loopback", "allow"]),
            Some("loopback")
        );
    }
}
