//! The text a privacy filter needs, from the triggers it declared through the contract's
//! `answer-triggers` and `request-triggers` (`wit/meridian-plugin.wit`).
//!
//! Of a request, the filter is called only when one of its segments contains a trigger
//! ([`Triggers::any_in`]). Of an answer it is shown nothing until one appears (found also when
//! split across pieces), then the text from up to [`LOOKBEHIND`] bytes before it, and every later
//! piece ([`Gate`]). A filter that declared nothing sees everything; one that declared an empty
//! list sees nothing. Skipping text skips the call, and with it the instance it would have
//! needed: most requests hold nothing a scanner for personal data looks for, and most answers no
//! secret prefix, so for them such a filter costs a search of the text and nothing more.

use std::borrow::Cow;
use std::sync::Arc;

use aho_corasick::{packed, AhoCorasick, MatchKind};

/// Bytes of the answer before the first trigger that the filter's first call still gets: the
/// context a scanner reads to decide where a token starts.
pub const LOOKBEHIND: usize = 256;

/// Most triggers a filter may declare.
pub const MAX_TRIGGERS: usize = 64;

/// Longest trigger, in bytes.
pub const MAX_TRIGGER_BYTES: usize = 64;

/// A filter's declared triggers, checked, with the searchers that find them.
#[derive(Debug, Clone)]
pub struct Triggers {
    literals: Vec<String>,
    /// One searcher per length class (1, 2, and 3 bytes or more), each leftmost-first. Apart,
    /// each class gets a SIMD (Teddy) searcher fingerprinting as many bytes as its shortest
    /// literal: mixed into one, the single bytes would leave the longer ones a one-byte
    /// fingerprint (`s` of `sk-`), which prose hits at every other word. Measured here on 2 KB
    /// of prose with pii-redactor's 28 triggers: ~0.2 µs, against ~3.4 µs for one automaton.
    searchers: Vec<Searcher>,
    /// The longest one's length.
    longest: usize,
}

/// How one class of triggers is searched for.
#[derive(Debug, Clone)]
enum Searcher {
    /// SIMD, where the CPU has it.
    Packed(packed::Searcher),
    /// An automaton everywhere else.
    Automaton(AhoCorasick),
}

impl Searcher {
    fn new(literals: &[&String]) -> Result<Searcher, String> {
        if let Some(packed) = packed::Config::new().builder().extend(literals).build() {
            return Ok(Searcher::Packed(packed));
        }
        let automaton = AhoCorasick::builder().match_kind(MatchKind::LeftmostFirst).build(literals);
        // Bounded above (64 patterns of at most 64 bytes), so building cannot fail for size.
        Ok(Searcher::Automaton(automaton.map_err(|e| format!("cannot search for them: {e}"))?))
    }

    /// Where the leftmost trigger of this class in `text` starts.
    fn find(&self, text: &str) -> Option<usize> {
        match self {
            Searcher::Packed(s) => s.find(text).map(|m| m.start()),
            Searcher::Automaton(a) => a.find(text).map(|m| m.start()),
        }
    }
}

impl Triggers {
    /// Checks what a filter declared: at most [`MAX_TRIGGERS`], each 1–[`MAX_TRIGGER_BYTES`]
    /// bytes.
    pub fn new(literals: Vec<String>) -> Result<Triggers, String> {
        if literals.len() > MAX_TRIGGERS {
            return Err(format!("{} triggers, at most {MAX_TRIGGERS}", literals.len()));
        }
        if let Some(bad) = literals.iter().find(|t| t.is_empty() || t.len() > MAX_TRIGGER_BYTES) {
            return Err(format!("{:?} is not 1-{MAX_TRIGGER_BYTES} bytes", bad));
        }
        let longest = literals.iter().map(String::len).max().unwrap_or(0);
        let mut searchers = Vec::new();
        for class in 1..=3 {
            let members: Vec<&String> = literals.iter().filter(|t| t.len().min(3) == class).collect();
            if !members.is_empty() {
                searchers.push(Searcher::new(&members)?);
            }
        }
        Ok(Triggers { literals, searchers, longest })
    }

    /// The declared literals.
    pub fn literals(&self) -> &[String] {
        &self.literals
    }

    /// Whether one of the triggers occurs in `text`.
    pub fn any_in(&self, text: &str) -> bool {
        self.searchers.iter().any(|s| s.find(text).is_some())
    }

    /// Where the first trigger in `text` starts.
    fn first_in(&self, text: &str) -> Option<usize> {
        self.searchers.iter().filter_map(|s| s.find(text)).min()
    }
}

/// What to do with one piece of an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<'a> {
    /// Show the filter this text (the piece, or the first trigger's context and the piece).
    Show(Cow<'a, str>),
    /// Nothing the filter needs: no call.
    Skip,
}

/// One answer's gate for one filter.
#[derive(Debug)]
pub enum Gate {
    /// The filter sees every piece: it declared nothing, or a trigger has appeared.
    Open,
    /// No trigger yet: the answer's last bytes, where a trigger split across pieces or the first
    /// one's context would be. The triggers are the plugin's, shared by all its answers.
    Waiting { triggers: Arc<Triggers>, held: String },
}

impl Gate {
    /// A gate for `triggers` (`None`: every piece is shown).
    pub fn new(triggers: Option<&Arc<Triggers>>) -> Gate {
        match triggers {
            None => Gate::Open,
            Some(t) => Gate::Waiting { triggers: Arc::clone(t), held: String::new() },
        }
    }

    /// Whether the filter is to be shown `piece`, and what of it.
    pub fn admit<'a>(&mut self, piece: &'a str) -> Admit<'a> {
        let Gate::Waiting { triggers, held } = self else { return Admit::Show(Cow::Borrowed(piece)) };
        if triggers.searchers.is_empty() {
            return Admit::Skip;
        }
        let shown = if held.is_empty() {
            // The answer's first piece (a whole answer's only one), or nothing kept before it:
            // searched where it lies, without a copy.
            triggers.first_in(piece).map(|at| Cow::Borrowed(&piece[context_start(piece, at)..]))
        } else {
            held.push_str(piece);
            triggers.first_in(held).map(|at| {
                let shown = std::mem::take(held);
                Cow::Owned(shown[context_start(&shown, at)..].to_owned())
            })
        };
        if let Some(shown) = shown {
            *self = Gate::Open;
            return Admit::Show(shown);
        }
        if held.is_empty() {
            held.push_str(piece);
        }
        // Keep what a trigger completed by the next piece, and its context, could need.
        let keep = LOOKBEHIND + triggers.longest - 1;
        if held.len() > keep {
            let mut cut = held.len() - keep;
            while !held.is_char_boundary(cut) {
                cut += 1;
            }
            held.drain(..cut);
        }
        Admit::Skip
    }
}

/// Where the context of a trigger at `at` starts: at most [`LOOKBEHIND`] bytes before it, on a
/// character boundary, and just after the first whitespace in that span when there is one (so
/// that the text shown does not begin inside a word a scanner would misread). Text that starts
/// at the answer's start is a word's start already.
fn context_start(text: &str, at: usize) -> usize {
    let mut start = at.saturating_sub(LOOKBEHIND);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    if start == 0 {
        return 0;
    }
    match text[start..at].find(|c: char| c.is_ascii_whitespace()) {
        Some(ws) => start + ws + 1,
        None => start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(literals: &[&str]) -> Gate {
        Gate::new(Some(&Arc::new(Triggers::new(literals.iter().map(|s| s.to_string()).collect()).unwrap())))
    }

    fn shown(admit: Admit<'_>) -> Option<String> {
        match admit {
            Admit::Show(text) => Some(text.into_owned()),
            Admit::Skip => None,
        }
    }

    #[test]
    fn without_a_declaration_every_piece_is_shown() {
        let mut g = Gate::new(None);
        assert_eq!(shown(g.admit("anything")).as_deref(), Some("anything"));
    }

    #[test]
    fn an_empty_declaration_shows_nothing() {
        let mut g = gate(&[]);
        assert_eq!(shown(g.admit("sk-anything at all")), None);
    }

    #[test]
    fn nothing_is_shown_until_a_trigger_then_everything() {
        let mut g = gate(&["sk-", "AKIA"]);
        assert_eq!(shown(g.admit("Here is the answer. ")), None);
        assert_eq!(shown(g.admit("Your key: sk-abc")).as_deref(), Some("Here is the answer. Your key: sk-abc"));
        assert_eq!(shown(g.admit("def")).as_deref(), Some("def"));
        assert_eq!(shown(g.admit("no trigger here")).as_deref(), Some("no trigger here"));
    }

    #[test]
    fn a_trigger_split_across_pieces_is_found() {
        let mut g = gate(&["-----BEGIN "]);
        assert_eq!(shown(g.admit("key: ---")), None);
        assert_eq!(shown(g.admit("--BEG")), None);
        assert_eq!(shown(g.admit("IN RSA")).as_deref(), Some("key: -----BEGIN RSA"));
    }

    #[test]
    fn context_is_bounded_and_starts_after_a_whitespace() {
        let mut g = gate(&["sk-"]);
        let filler = "word ".repeat(200);
        assert_eq!(shown(g.admit(&filler)), None);
        let text = shown(g.admit("sk-x")).unwrap();
        assert!(text.len() <= LOOKBEHIND + 4, "{}", text.len());
        assert!(text.starts_with("word ") && text.ends_with("word sk-x"), "{text:?}");
    }

    #[test]
    fn a_whole_answer_is_shown_from_its_triggers_context_without_a_copy() {
        let mut g = gate(&["sk-"]);
        let answer = format!("{}sk-x", "word ".repeat(200));
        match g.admit(&answer) {
            Admit::Show(Cow::Borrowed(text)) => {
                assert!(text.len() <= LOOKBEHIND + 4 && text.starts_with("word ") && text.ends_with("sk-x"), "{text:?}")
            }
            other => panic!("shown in place: {other:?}"),
        }
        assert_eq!(shown(g.admit("more")).as_deref(), Some("more"));
    }

    #[test]
    fn held_text_is_cut_on_character_boundaries() {
        let mut g = gate(&["sk-"]);
        for _ in 0..100 {
            assert_eq!(shown(g.admit("ééééé")), None);
        }
        let text = shown(g.admit("sk-")).unwrap();
        assert!(text.ends_with("ésk-"));
    }

    #[test]
    fn a_request_needs_one_trigger_anywhere_in_it() {
        let t = Triggers::new(["0", "1", "@", "sk-"].map(String::from).to_vec()).unwrap();
        assert!(!t.any_in("benchmark the edge overhead"));
        assert!(t.any_in("write to jane@example.com"));
        assert!(t.any_in("order 10"));
        assert!(t.any_in("the key sk-abc"));
        assert!(!t.any_in("sk_ and s k- are not it"));
        assert!(!Triggers::new(Vec::new()).unwrap().any_in("0 @ sk-"));
    }

    #[test]
    fn the_first_trigger_is_the_leftmost_whichever_was_declared_first() {
        let t = Triggers::new(["BEGIN", "sk-"].map(String::from).to_vec()).unwrap();
        assert_eq!(t.first_in("a sk- then BEGIN"), Some(2));
        assert_eq!(t.first_in("BEGIN then sk-"), Some(0));
        assert_eq!(t.first_in("neither"), None);
    }

    #[test]
    fn the_searchers_agree_with_a_plain_search() {
        // pii-redactor's triggers, and text built from pieces that hold, split or nearly spell them.
        let literals: Vec<String> =
            ["0", "7", "@", ":", "sk-", "AKIA", "eyJ", "-----BEGIN ", "ghp_", "xy"].map(String::from).to_vec();
        let t = Triggers::new(literals.clone()).unwrap();
        let pieces =
            ["a", " ", "s", "k", "-", "sk", "AKI", "A", "ey", "J", "---", "--BEGIN", " ", "gh", "p_", "x", "y"];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..2000 {
            let mut text = "prose ".repeat((state % 40) as usize);
            for _ in 0..12 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push_str(pieces[(state % pieces.len() as u64) as usize]);
                if state.is_multiple_of(97) {
                    text.push_str(["0", "7", "@", ":"][(state % 4) as usize]);
                }
            }
            let plain = literals.iter().filter_map(|l| text.find(l.as_str())).min();
            assert_eq!(t.first_in(&text), plain, "{text:?}");
            assert_eq!(t.any_in(&text), plain.is_some(), "{text:?}");
        }
    }

    #[test]
    fn declarations_are_bounded() {
        assert!(Triggers::new(vec![String::new()]).is_err());
        assert!(Triggers::new(vec!["x".repeat(65)]).is_err());
        assert!(Triggers::new(vec!["x".into(); 65]).is_err());
        assert!(Triggers::new(vec!["x".repeat(64); 64]).is_ok());
    }
}
