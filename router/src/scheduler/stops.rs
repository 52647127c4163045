//! Stop strings matched incrementally: one Knuth–Morris–Pratt automaton per stop string,
//! advanced over each token's new text only, so a token costs O(new bytes × stops) whatever the
//! length of the stops or of the text so far (rescanning the held text and testing every prefix
//! of every stop cost 40 ms of scheduler time per token with four 1.9 MB stops). Matching is on
//! bytes: a valid UTF-8 pattern found in valid UTF-8 text starts and ends on character
//! boundaries, and so does the partial match a sequence holds back.

/// One stop string and how much of it the text's tail matches.
#[derive(Debug, Clone)]
struct Kmp {
    pat: Vec<u8>,
    /// `fail[i]`: length of the longest proper border of `pat[..=i]`.
    fail: Vec<usize>,
    state: usize,
}

impl Kmp {
    fn new(pat: &str) -> Kmp {
        let pat = pat.as_bytes().to_vec();
        let mut fail = vec![0; pat.len()];
        let mut k = 0;
        for i in 1..pat.len() {
            while k > 0 && pat[i] != pat[k] {
                k = fail[k - 1];
            }
            if pat[i] == pat[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Kmp {
            pat,
            fail,
            state: 0,
        }
    }

    /// Advances over `b`; true when the whole pattern now ends here.
    fn step(&mut self, b: u8) -> bool {
        while self.state > 0 && (self.state == self.pat.len() || self.pat[self.state] != b) {
            self.state = self.fail[self.state - 1];
        }
        if self.pat.get(self.state) == Some(&b) {
            self.state += 1;
        }
        self.state == self.pat.len()
    }
}

/// The stop strings of one sequence.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<Kmp>,
}

impl StopMatcher {
    /// Empty stop strings are ignored (validation refuses them).
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Kmp::new(s))
                .collect(),
        }
    }

    /// Feeds `text`, the bytes that follow what was fed before. Returns `Some((end, len))` at
    /// the first byte where a stop string is complete: `end` is the index in `text` just past
    /// it and `len` the length of the longest stop string completed there (the one starting
    /// earliest). Otherwise `None`.
    pub fn feed(&mut self, text: &[u8]) -> Option<(usize, usize)> {
        for (i, &b) in text.iter().enumerate() {
            let mut longest = None;
            for k in &mut self.stops {
                if k.step(b) {
                    longest = longest.max(Some(k.pat.len()));
                }
            }
            if let Some(len) = longest {
                return Some((i + 1, len));
            }
        }
        None
    }

    /// Bytes at the end of the text fed so far that could still begin a stop string.
    pub fn partial(&self) -> usize {
        self.stops.iter().map(|k| k.state).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: every stop string searched in the whole text.
    fn naive(text: &str, stops: &[&str]) -> Option<usize> {
        stops
            .iter()
            .filter_map(|s| text.find(s).map(|p| (p + s.len(), p)))
            .min()
            .map(|(_, start)| start)
    }

    /// Feeds `chunks` one by one as a sequence does; the start of the stop found, if any.
    fn incremental(chunks: &[&str], stops: &[&str]) -> Option<usize> {
        let owned: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&owned);
        let mut fed = 0;
        for c in chunks {
            if let Some((end, len)) = m.feed(c.as_bytes()) {
                return Some(fed + end - len);
            }
            fed += c.len();
            assert!(m.partial() <= fed);
        }
        None
    }

    #[test]
    fn matches_across_chunks_like_a_search_of_the_whole_text() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["Hel", "lo wor", "ld"], &["o w"]),
            (&["aaa", "ab"], &["aab"]),
            (&["ab", "ab", "abc"], &["ababc"]),
            (&["x", "y"], &["z"]),
            (&["héllo", " wörld"], &["ö"]),
            (&["one two", " three"], &["three", "two"]),
            (&["abcd"], &["bcd", "c"]),
        ];
        for (chunks, stops) in cases {
            let whole: String = chunks.concat();
            // The first stop to complete wins, as when text arrives token by token.
            let want = stops
                .iter()
                .filter_map(|s| {
                    whole
                        .find(s)
                        .map(|p| (p + s.len(), std::cmp::Reverse(s.len()), p))
                })
                .min()
                .map(|(_, _, p)| p);
            assert_eq!(incremental(chunks, stops), want, "{chunks:?} {stops:?}");
            if stops.len() == 1 {
                assert_eq!(want, naive(&whole, stops));
            }
        }
    }

    #[test]
    fn the_held_tail_is_the_longest_partial_match() {
        let mut m = StopMatcher::new(&["abcab".into(), "xy".into()]);
        assert!(m.feed(b"zzab").is_none());
        assert_eq!(m.partial(), 2);
        assert!(m.feed(b"ca").is_none());
        assert_eq!(m.partial(), 4);
        assert!(m.feed(b"x").is_none());
        assert_eq!(m.partial(), 1);
        assert_eq!(m.feed(b"y"), Some((1, 2)));
    }

    #[test]
    fn a_long_stop_is_tracked_as_its_prefix_grows() {
        let stop = "ab".repeat(1 << 19);
        let mut m = StopMatcher::new(&[stop]);
        for _ in 0..10_000 {
            assert!(m.feed(b"ab").is_none());
        }
        assert_eq!(m.partial(), 20_000);
    }
}
