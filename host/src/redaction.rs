//! Reversible redaction: the host's half of privacy filtering.
//!
//! A privacy filter sees a request's text as [`Segment`]s and names [`Redaction`]s. The host
//! swaps each span for a placeholder such as `[EMAIL_1]` (equal values of one entity get the same
//! placeholder), keeps the map from placeholders to originals on the node, and puts the originals
//! back into the answer — whole, or streamed, where a placeholder split across chunks is held back
//! only until it can be told apart from ordinary text.

use std::collections::HashMap;

use crate::chat::{ChatRequest, Content, Role};
use crate::plugin::{Redaction, Segment, SegmentKind};

/// Spans that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    /// The span names no segment, is empty or reversed, ends past the text, or cuts a character.
    #[error("redaction {index} is out of range or not on character boundaries")]
    OutOfRange {
        /// Its position in the list.
        index: usize,
    },
    /// Two spans overlap.
    #[error("redactions {0} and {1} overlap")]
    Overlap(usize, usize),
    /// An entity name that cannot make a placeholder.
    #[error("redaction {index} has an invalid entity name (want 1-32 of [a-z0-9_])")]
    BadEntity {
        /// Its position in the list.
        index: usize,
    },
}

/// Where each segment came from, to write redacted text back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Content { message: usize },
    Part { message: usize, part: usize },
    Arguments { message: usize, call: usize },
}

/// Lists a request's text in order: every message's content (or each text part) and every tool
/// call's arguments.
pub fn segments(req: &ChatRequest) -> Vec<Segment> {
    slots(req).into_iter().map(|(slot, kind)| Segment { kind, text: slot_text(req, slot).to_string() }).collect()
}

fn slots(req: &ChatRequest) -> Vec<(Slot, SegmentKind)> {
    let mut out = Vec::new();
    for (message, m) in req.messages.iter().enumerate() {
        let kind = match m.role {
            Role::System | Role::Developer => SegmentKind::System,
            Role::User => SegmentKind::User,
            Role::Assistant => SegmentKind::Assistant,
            Role::Tool => SegmentKind::ToolResult,
        };
        match &m.content {
            Some(Content::Text(_)) => out.push((Slot::Content { message }, kind)),
            Some(Content::Parts(parts)) => {
                for (part, p) in parts.iter().enumerate() {
                    if p.text.is_some() {
                        out.push((Slot::Part { message, part }, kind));
                    }
                }
            }
            None => {}
        }
        for call in 0..m.tool_calls.as_ref().map_or(0, Vec::len) {
            out.push((Slot::Arguments { message, call }, SegmentKind::ToolArguments));
        }
    }
    out
}

fn slot_text(req: &ChatRequest, slot: Slot) -> &str {
    let m = |i: usize| &req.messages[i];
    match slot {
        Slot::Content { message } => match &m(message).content {
            Some(Content::Text(t)) => t,
            _ => "",
        },
        Slot::Part { message, part } => match &m(message).content {
            Some(Content::Parts(parts)) => parts[part].text.as_deref().unwrap_or(""),
            _ => "",
        },
        Slot::Arguments { message, call } => {
            m(message).tool_calls.as_ref().map_or("", |c| c[call].function.arguments.as_str())
        }
    }
}

fn slot_text_mut(req: &mut ChatRequest, slot: Slot) -> Option<&mut String> {
    match slot {
        Slot::Content { message } => match &mut req.messages[message].content {
            Some(Content::Text(t)) => Some(t),
            _ => None,
        },
        Slot::Part { message, part } => match &mut req.messages[message].content {
            Some(Content::Parts(parts)) => parts[part].text.as_mut(),
            _ => None,
        },
        Slot::Arguments { message, call } => {
            req.messages[message].tool_calls.as_mut().map(|c| &mut c[call].function.arguments)
        }
    }
}

/// Placeholders handed out for one request, and the originals they stand for.
#[derive(Debug, Clone, Default)]
pub struct Placeholders {
    originals: HashMap<String, String>,
    by_value: HashMap<(String, String), String>,
    counts: HashMap<String, usize>,
    longest: usize,
}

impl Placeholders {
    /// How many distinct values were redacted.
    pub fn len(&self) -> usize {
        self.originals.len()
    }

    /// Whether nothing was redacted.
    pub fn is_empty(&self) -> bool {
        self.originals.is_empty()
    }

    /// The placeholder for `value` of `entity`, the same one each time within a request.
    fn placeholder(&mut self, entity: &str, value: &str) -> String {
        if let Some(p) = self.by_value.get(&(entity.to_string(), value.to_string())) {
            return p.clone();
        }
        let n = self.counts.entry(entity.to_string()).or_insert(0);
        *n += 1;
        let placeholder = format!("[{}_{n}]", entity.to_ascii_uppercase());
        self.longest = self.longest.max(placeholder.len());
        self.originals.insert(placeholder.clone(), value.to_string());
        self.by_value.insert((entity.to_string(), value.to_string()), placeholder.clone());
        placeholder
    }

    /// `text` with every complete placeholder replaced by its original.
    pub fn restore(&self, text: &str) -> String {
        self.restore_with(text, false)
    }

    /// Like [`Placeholders::restore`] for the inside of a JSON string (tool-call arguments):
    /// originals are JSON-escaped so the arguments stay valid JSON.
    pub fn restore_json(&self, text: &str) -> String {
        self.restore_with(text, true)
    }

    fn restore_with(&self, text: &str, json: bool) -> String {
        if self.is_empty() || !text.contains('[') {
            return text.to_string();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(open) = rest.find('[') {
            out.push_str(&rest[..open]);
            let candidate = &rest[open..];
            let close = candidate.find(']').filter(|&c| c < self.longest);
            match close.and_then(|c| self.originals.get(&candidate[..=c]).map(|o| (c, o))) {
                Some((c, original)) => {
                    if json {
                        let quoted = serde_json::to_string(original).unwrap_or_default();
                        out.push_str(&quoted[1..quoted.len() - 1]);
                    } else {
                        out.push_str(original);
                    }
                    rest = &candidate[c + 1..];
                }
                None => {
                    out.push('[');
                    rest = &candidate[1..];
                }
            }
        }
        out.push_str(rest);
        out
    }
}

/// Restores placeholders in one stream of text (an answer's text, or one tool call's arguments)
/// that arrives in pieces, holding back a tail only while it could still become a placeholder.
#[derive(Debug, Default)]
pub struct StreamRestorer {
    pending: String,
    json: bool,
}

impl StreamRestorer {
    /// A restorer for plain text, or for the inside of a JSON string when `json`.
    pub fn new(json: bool) -> Self {
        StreamRestorer { pending: String::new(), json }
    }

    /// Adds a piece and returns the text that is now final.
    pub fn push(&mut self, placeholders: &Placeholders, piece: &str) -> String {
        self.pending.push_str(piece);
        let hold = self.held_tail(placeholders);
        let ready: String = self.pending.drain(..hold).collect();
        placeholders.restore_with(&ready, self.json)
    }

    /// The rest, at the end of the stream.
    pub fn finish(&mut self, placeholders: &Placeholders) -> String {
        let rest = std::mem::take(&mut self.pending);
        placeholders.restore_with(&rest, self.json)
    }

    /// Where the pending text stops being final: at the last `[` if what follows it is a proper
    /// prefix of some placeholder.
    fn held_tail(&self, p: &Placeholders) -> usize {
        match self.pending.rfind('[') {
            Some(open) if self.pending.len() - open < p.longest && !self.pending[open..].contains(']') => {
                let tail = &self.pending[open..];
                if p.originals.keys().any(|k| k.starts_with(tail)) {
                    open
                } else {
                    self.pending.len()
                }
            }
            _ => self.pending.len(),
        }
    }
}

/// Joins overlapping spans of one segment into their union, so that what any filter
/// asked to hide stays hidden; the union keeps the entity of the span that starts first.
pub fn merge(mut spans: Vec<Redaction>) -> Vec<Redaction> {
    spans.sort_by_key(|s| (s.segment, s.start));
    let mut out: Vec<Redaction> = Vec::with_capacity(spans.len());
    for s in spans {
        match out.last_mut() {
            Some(last) if last.segment == s.segment && s.start < last.end => last.end = last.end.max(s.end),
            _ => out.push(s),
        }
    }
    out
}

/// Replaces `spans` of the request's [`segments`] with placeholders, in place. Overlapping spans
/// (from different filters) are refused: merge them first with [`merge`].
pub fn redact(req: &mut ChatRequest, spans: &[Redaction]) -> Result<Placeholders, SpanError> {
    let slots = slots(req);
    let mut order: Vec<usize> = (0..spans.len()).collect();
    for (i, s) in spans.iter().enumerate() {
        let (segment, start, end) = (s.segment as usize, s.start as usize, s.end as usize);
        let ok = segment < slots.len() && start < end && {
            let text = slot_text(req, slots[segment].0);
            end <= text.len() && text.is_char_boundary(start) && text.is_char_boundary(end)
        };
        if !ok {
            return Err(SpanError::OutOfRange { index: i });
        }
        if !crate::plugin::valid_entity(&s.entity) {
            return Err(SpanError::BadEntity { index: i });
        }
    }
    // Apply from the end of each segment backwards, so earlier offsets stay valid; placeholders
    // are numbered in reading order first so that `[EMAIL_1]` is the first e-mail in the text.
    order.sort_by_key(|&i| (spans[i].segment, spans[i].start));
    for w in order.windows(2) {
        let (a, b) = (&spans[w[0]], &spans[w[1]]);
        if a.segment == b.segment && b.start < a.end {
            return Err(SpanError::Overlap(w[0], w[1]));
        }
    }
    let mut placeholders = Placeholders::default();
    let mut replacement: Vec<String> = vec![String::new(); spans.len()];
    for &i in &order {
        let s = &spans[i];
        let value = slot_text(req, slots[s.segment as usize].0)[s.start as usize..s.end as usize].to_string();
        replacement[i] = placeholders.placeholder(&s.entity, &value);
    }
    for &i in order.iter().rev() {
        let s = &spans[i];
        if let Some(text) = slot_text_mut(req, slots[s.segment as usize].0) {
            text.replace_range(s.start as usize..s.end as usize, &replacement[i]);
        }
    }
    Ok(placeholders)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{FunctionCall, Message, ToolCall};

    fn request() -> ChatRequest {
        let mut assistant = Message::text(Role::Assistant, "");
        assistant.content = None;
        assistant.tool_calls = Some(vec![ToolCall {
            id: "c1".into(),
            kind: "function".into(),
            function: FunctionCall { name: "mail".into(), arguments: r#"{"to":"ann@x.io"}"#.into() },
            anthropic_extra: Default::default(),
        }]);
        ChatRequest {
            model: "m".into(),
            messages: vec![
                Message::text(Role::System, "be brief"),
                Message::text(Role::User, "mail ann@x.io and bob@y.io, then ann@x.io again — ünïcode"),
                assistant,
            ],
            ..ChatRequest::default()
        }
    }

    fn span(segment: u32, text: &str, value: &str, entity: &str) -> Redaction {
        let start = text.find(value).unwrap();
        Redaction { segment, start: start as u32, end: (start + value.len()) as u32, entity: entity.into() }
    }

    #[test]
    fn equal_values_share_a_placeholder_and_come_back() {
        let mut req = request();
        let segs = segments(&req);
        assert_eq!(
            segs.iter().map(|s| s.kind).collect::<Vec<_>>(),
            [SegmentKind::System, SegmentKind::User, SegmentKind::ToolArguments]
        );
        let user = &segs[1].text;
        let second_ann = user.rfind("ann@x.io").unwrap();
        let spans = vec![
            span(1, user, "ann@x.io", "email"),
            span(1, user, "bob@y.io", "email"),
            Redaction { segment: 1, start: second_ann as u32, end: second_ann as u32 + 8, entity: "email".into() },
            span(2, &segs[2].text, "ann@x.io", "email"),
        ];
        let p = redact(&mut req, &spans).unwrap();
        let redacted = req.messages[1].content_text();
        assert_eq!(redacted, "mail [EMAIL_1] and [EMAIL_2], then [EMAIL_1] again — ünïcode");
        assert_eq!(req.messages[2].tool_calls.as_ref().unwrap()[0].function.arguments, r#"{"to":"[EMAIL_1]"}"#);
        assert_eq!(p.restore(&redacted), "mail ann@x.io and bob@y.io, then ann@x.io again — ünïcode");
        assert_eq!(p.restore("[EMAIL_3] and [not one] stay"), "[EMAIL_3] and [not one] stay");
    }

    #[test]
    fn bad_spans_are_refused() {
        let mut req = request();
        let bad = |segment, start: usize, end: usize| Redaction {
            segment,
            start: start as u32,
            end: end as u32,
            entity: "email".into(),
        };
        assert!(matches!(redact(&mut req, &[bad(9, 0, 1)]), Err(SpanError::OutOfRange { index: 0 })));
        assert!(matches!(redact(&mut req, &[bad(1, 5, 5)]), Err(SpanError::OutOfRange { .. })));
        let text = segments(&req)[1].text.clone();
        let inside = text.find('ü').unwrap() + 1;
        assert!(matches!(redact(&mut req, &[bad(1, inside, inside + 1)]), Err(SpanError::OutOfRange { .. })));
        assert!(matches!(redact(&mut req, &[bad(1, 0, 6), bad(1, 5, 9)]), Err(SpanError::Overlap(..))));
        let merged = merge(vec![bad(1, 5, 9), bad(2, 0, 2), bad(1, 0, 6), bad(1, 9, 12)]);
        assert_eq!(
            merged.iter().map(|s| (s.segment, s.start, s.end)).collect::<Vec<_>>(),
            [(1, 0, 9), (1, 9, 12), (2, 0, 2)]
        );
        let shouty = Redaction { segment: 1, start: 0, end: 4, entity: "E-MAIL".into() };
        assert!(matches!(redact(&mut req, &[shouty]), Err(SpanError::BadEntity { index: 0 })));
        assert_eq!(req, request(), "a refused redaction changes nothing");
    }

    #[test]
    fn a_placeholder_split_anywhere_in_a_stream_is_restored() {
        let mut req = request();
        let user = segments(&req)[1].text.clone();
        let p = redact(&mut req, &[span(1, &user, "bob@y.io", "email")]).unwrap();
        let answer = "Wrote to [EMAIL_1]; [sic] [EMAIL_";
        for split in 0..=answer.len() {
            if !answer.is_char_boundary(split) {
                continue;
            }
            let mut r = StreamRestorer::new(false);
            let mut out = r.push(&p, &answer[..split]);
            out += &r.push(&p, &answer[split..]);
            out += &r.finish(&p);
            assert_eq!(out, "Wrote to bob@y.io; [sic] [EMAIL_", "split at {split}");
        }
        let mut r = StreamRestorer::new(false);
        assert_eq!(r.push(&p, "to [EMA"), "to ", "a possible placeholder is held back");
        assert_eq!(r.push(&p, "IL_1] ok"), "bob@y.io ok");
        assert_eq!(r.push(&p, "[x"), "[x", "text that cannot become a placeholder is not held");
    }

    #[test]
    fn json_contexts_get_escaped_originals() {
        let mut req = request();
        let user = segments(&req)[1].text.clone();
        let p = redact(&mut req, &[span(1, &user, "bob@y.io", "email")]).unwrap();
        let mut p2 = p.clone();
        let quoted = p2.placeholder("name", "Bob \"the\" Builder");
        assert_eq!(p2.restore_json(&format!("{{\"n\":\"{quoted}\"}}")), r#"{"n":"Bob \"the\" Builder"}"#);
    }
}
