//! Server-sent events: an incremental parser for upstream streams and the writer for clients.
//!
//! The parser is bounded and linear: each byte is scanned once (a partial line is kept, never
//! rescanned), an event may not grow past its limit, and every line must be UTF-8. A breach is an
//! [`SseError`], after which the parser refuses every further chunk: an upstream that sent it is
//! not to be trusted with the rest of the stream.

use bytes::{BufMut, BytesMut};

/// The largest event [`SseParser::default`] accepts: far above any real chunk of a chat stream
/// (each carries a few tokens), far below what could hurt the node.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

/// One parsed event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Why a stream cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// An event (its lines so far, including one not yet ended) grew past the limit.
    #[error("an event exceeds the limit of {limit} bytes")]
    EventTooLarge {
        /// The limit.
        limit: usize,
    },
    /// A line is not UTF-8.
    #[error("the stream is not valid UTF-8")]
    InvalidUtf8,
}

/// Parses a byte stream into events as chunks arrive; chunk boundaries may fall anywhere, even
/// inside a UTF-8 character.
#[derive(Debug)]
pub struct SseParser {
    /// The line begun but not yet ended by a newline: only a chunk's tail goes here.
    partial: Vec<u8>,
    current: SseEvent,
    has_data: bool,
    /// Bytes of the current event's ended lines, counted against `max_event_bytes`.
    event_bytes: usize,
    max_event_bytes: usize,
    failed: Option<SseError>,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseParser {
    /// A parser that refuses events larger than `max_event_bytes` (lines and their newlines).
    pub fn new(max_event_bytes: usize) -> Self {
        SseParser {
            partial: Vec::new(),
            current: SseEvent::default(),
            has_data: false,
            event_bytes: 0,
            max_event_bytes,
            failed: None,
        }
    }

    /// Feeds a chunk and returns every event it completes. After an error, every call returns
    /// that error.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut out = Vec::new();
        match self.push_into(chunk, &mut out) {
            Ok(()) => Ok(out),
            Err(e) => {
                self.failed = Some(e.clone());
                self.partial = Vec::new();
                Err(e)
            }
        }
    }

    fn push_into(&mut self, mut chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
            let (head, rest) = (&chunk[..pos], &chunk[pos + 1..]);
            chunk = rest;
            self.grow(head.len() + 1)?;
            if self.partial.is_empty() {
                self.line(head, out)?;
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.line(&line, out)?;
                // Keep the allocation for the next partial line.
                line.clear();
                self.partial = line;
            }
        }
        if !chunk.is_empty() {
            self.grow(chunk.len())?;
            self.partial.extend_from_slice(chunk);
        }
        Ok(())
    }

    /// Counts `n` more bytes of the current event (the unended line included) against the limit.
    fn grow(&self, n: usize) -> Result<(), SseError> {
        let size = self.event_bytes + self.partial.len() + n;
        if size > self.max_event_bytes {
            return Err(SseError::EventTooLarge { limit: self.max_event_bytes });
        }
        Ok(())
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = std::str::from_utf8(line).map_err(|_| SseError::InvalidUtf8)?;
        if line.is_empty() {
            self.event_bytes = 0;
            if self.has_data || self.current.event.is_some() {
                out.push(std::mem::take(&mut self.current));
                self.has_data = false;
            }
            return Ok(());
        }
        self.event_bytes += line.len() + 1;
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.current.event = Some(value.to_string()),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Appends one event in wire form: an optional `event:` line, one `data:` line, a blank line.
pub fn write_event(out: &mut BytesMut, event: Option<&str>, data: &[u8]) {
    if let Some(name) = event {
        out.put_slice(b"event: ");
        out.put_slice(name.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"data: ");
    out.put_slice(data);
    out.put_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_parse_the_same() {
        let wire = "event: message_start\r\ndata: {\"a\":\"é\"}\r\n\r\n: ping\n\ndata: one\ndata: two\n\n".as_bytes();
        for split in 0..wire.len() {
            let mut p = SseParser::default();
            let mut out = p.push(&wire[..split]).unwrap();
            out.extend(p.push(&wire[split..]).unwrap());
            assert_eq!(
                out,
                vec![
                    SseEvent { event: Some("message_start".into()), data: "{\"a\":\"é\"}".into() },
                    SseEvent { event: None, data: "one\ntwo".into() },
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn a_line_that_never_ends_is_refused_at_the_limit() {
        let mut p = SseParser::new(1000);
        let mut sent = 0;
        let err = loop {
            match p.push(b"data: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx") {
                Ok(events) => assert!(events.is_empty()),
                Err(e) => break e,
            }
            sent += 1;
            assert!(sent < 1000, "the line is refused");
        };
        assert_eq!(err, SseError::EventTooLarge { limit: 1000 });
        assert!(p.partial.len() <= 1000, "nothing past the limit is held");
        assert_eq!(p.push(b"\n\n"), Err(err), "a failed parser stays failed");
    }

    #[test]
    fn an_event_of_many_short_lines_is_refused_at_the_limit() {
        let mut p = SseParser::new(100);
        let err = (0..100).find_map(|_| p.push(b"data: 0123456789\n").err());
        assert_eq!(err, Some(SseError::EventTooLarge { limit: 100 }));
        // Events under the limit, one after another, are fine however many there are.
        let mut p = SseParser::new(100);
        for _ in 0..1000 {
            assert_eq!(p.push(b"data: 0123456789\n\n").unwrap().len(), 1);
        }
    }

    #[test]
    fn an_event_at_the_limit_is_accepted() {
        // An event's size is its lines with their newlines, the blank line that ends it too.
        let wire = b"data: abc\n\n";
        let mut p = SseParser::new(wire.len());
        assert_eq!(p.push(wire).unwrap(), vec![SseEvent { event: None, data: "abc".into() }]);
        assert_eq!(p.push(wire).unwrap().len(), 1, "the next event starts from nothing");
        let mut p = SseParser::new(wire.len() - 1);
        assert_eq!(p.push(wire), Err(SseError::EventTooLarge { limit: wire.len() - 1 }));
    }

    #[test]
    fn invalid_utf8_is_an_error_not_replacement_characters() {
        let mut p = SseParser::default();
        assert_eq!(p.push(b"data: ok\n\ndata: \xff\xfe\n\n"), Err(SseError::InvalidUtf8));
        // A character split across chunks is not invalid.
        let mut p = SseParser::default();
        let wire = "data: é\n\n".as_bytes();
        assert!(p.push(&wire[..7]).unwrap().is_empty());
        assert_eq!(p.push(&wire[7..]).unwrap(), vec![SseEvent { event: None, data: "é".into() }]);
    }

    #[test]
    fn a_long_line_in_tiny_chunks_is_scanned_once() {
        // A 1 MiB line fed a byte at a time: a parser that rescanned its buffer on each chunk
        // would take ~5e11 steps; this one takes a few million.
        let size = 1 << 20;
        let mut p = SseParser::new(size + 16);
        p.push(b"data: ").unwrap();
        let byte = [b'x'];
        for _ in 0..size {
            assert!(p.push(&byte).unwrap().is_empty());
        }
        let events = p.push(b"\n\n").unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data.len(), size);
    }
}
