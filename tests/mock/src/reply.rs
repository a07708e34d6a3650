//! The deterministic reply both APIs share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::Behavior;

/// What the request asks the mock to say, extracted from either API.
pub(crate) struct Extracted {
    /// Text of the last user message.
    pub last_user_text: String,
    /// The tool result text if the last message is a tool result.
    pub tool_result: Option<String>,
    /// The tool to call, if a tool call should be made.
    pub tool: Option<String>,
    /// Total characters of all message text plus the system prompt.
    pub prompt_chars: usize,
}

/// The reply, ready to be rendered by an API module.
pub(crate) enum Reply {
    /// A text reply: `text` is already truncated to the emitted pieces.
    Text {
        text: String,
        /// End offset of each piece in `text`.
        piece_ends: Vec<usize>,
        truncated: bool,
    },
    /// One tool call with JSON `arguments`.
    Tool { name: String, arguments: String },
}

impl Reply {
    /// Decides the reply for `ex`, truncated to `max_tokens` pieces.
    pub(crate) fn decide(ex: Extracted, max_tokens: Option<u64>) -> Reply {
        if let Some(result) = ex.tool_result {
            Reply::text(format!("Tool said: {result}"), max_tokens)
        } else if let Some(name) = ex.tool {
            let arguments = serde_json::json!({ "echo": ex.last_user_text }).to_string();
            Reply::Tool { name, arguments }
        } else {
            Reply::text(format!("Echo: {}", ex.last_user_text), max_tokens)
        }
    }

    /// The reply for `ex` under `behavior`: [`Behavior::Say`]'s text, or [`Reply::decide`].
    pub(crate) fn decide_for(ex: Extracted, max_tokens: Option<u64>, behavior: &Behavior) -> Reply {
        match behavior {
            Behavior::Say { pieces, .. } => {
                let mut text = String::new();
                let mut ends = Vec::with_capacity(pieces.len());
                for p in pieces.iter().filter(|p| !p.is_empty()) {
                    text.push_str(p);
                    ends.push(text.len());
                }
                Reply::text_in(text, ends, max_tokens)
            }
            _ => Reply::decide(ex, max_tokens),
        }
    }

    fn text(text: String, max_tokens: Option<u64>) -> Reply {
        let ends = piece_ends(&text);
        Reply::text_in(text, ends, max_tokens)
    }

    /// A text reply in the pieces ending at `piece_ends`, truncated to `max_tokens` pieces.
    fn text_in(mut text: String, mut piece_ends: Vec<usize>, max_tokens: Option<u64>) -> Reply {
        let truncated = max_tokens.is_some_and(|m| piece_ends.len() as u64 > m);
        if truncated {
            let keep = max_tokens.unwrap_or(0) as usize;
            piece_ends.truncate(keep);
            text.truncate(piece_ends.last().copied().unwrap_or(0));
        }
        Reply::Text { text, piece_ends, truncated }
    }

    /// Completion / output tokens: pieces emitted, or 5 for a tool call.
    pub(crate) fn completion_tokens(&self) -> u64 {
        match self {
            Reply::Text { piece_ends, .. } => piece_ends.len() as u64,
            Reply::Tool { .. } => 5,
        }
    }
}

/// The pieces of a text reply as slices (word plus its following whitespace).
pub(crate) fn pieces<'a>(text: &'a str, ends: &'a [usize]) -> impl Iterator<Item = &'a str> {
    let mut start = 0;
    ends.iter().map(move |&end| {
        let p = &text[start..end];
        start = end;
        p
    })
}

/// Splits after each whitespace run that is followed by a non-space.
fn piece_ends(s: &str) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut prev_ws = false;
    for (i, c) in s.char_indices() {
        let ws = c.is_whitespace();
        if prev_ws && !ws {
            ends.push(i);
        }
        prev_ws = ws;
    }
    if !s.is_empty() {
        ends.push(s.len());
    }
    ends
}

/// Splits `s` roughly in half on a char boundary (both halves non-empty for
/// any string of two or more chars).
pub(crate) fn split_half(s: &str) -> (&str, &str) {
    let mut mid = s.len() / 2;
    while !s.is_char_boundary(mid) {
        mid += 1;
    }
    s.split_at(mid)
}

/// Prompt tokens: characters / 4, at least 1.
pub(crate) fn prompt_tokens(chars: usize) -> u64 {
    (chars / 4).max(1) as u64
}

/// The next value of the global id counter.
pub(crate) fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_words() {
        let s = "Echo: hello  world";
        let ends = piece_ends(s);
        let p: Vec<_> = pieces(s, &ends).collect();
        assert_eq!(p, ["Echo: ", "hello  ", "world"]);
        assert!(piece_ends("").is_empty());
    }

    #[test]
    fn truncation() {
        let ex = Extracted { last_user_text: "a b c".into(), tool_result: None, tool: None, prompt_chars: 5 };
        let Reply::Text { text, piece_ends, truncated } = Reply::decide(ex, Some(2)) else {
            panic!("expected text");
        };
        assert_eq!(text, "Echo: a ");
        assert_eq!(piece_ends.len(), 2);
        assert!(truncated);
    }

    #[test]
    fn said_pieces_are_kept() {
        let ex = Extracted { last_user_text: "x".into(), tool_result: None, tool: None, prompt_chars: 1 };
        let say = Behavior::Say { pieces: vec!["ab".into(), String::new(), "cd e".into()], gap: Default::default() };
        let Reply::Text { text, piece_ends, truncated } = Reply::decide_for(ex, Some(5), &say) else {
            panic!("expected text");
        };
        assert_eq!((text.as_str(), piece_ends, truncated), ("abcd e", vec![2, 6], false));
    }

    #[test]
    fn halves() {
        let (a, b) = split_half("{\"echo\":\"é\"}");
        assert!(!a.is_empty() && !b.is_empty());
    }
}
