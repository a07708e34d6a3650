//! What to do with what the scanner finds: the plugin's configuration and its verdicts.

use std::collections::BTreeMap;

use meridian_plugin_sdk::{Inspection, Redaction, RequestVerdict, ResponseVerdict, Segment};
use serde::Deserialize;

use crate::scan::{scan, Entity};

/// What happens to a request that contains an entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Replace the value with a placeholder, and label the request `pii.<entity>.redacted`.
    Redact,
    /// Refuse the request.
    Block,
    /// Only label the request, `pii.<entity>`: the value stays in the text.
    Label,
}

impl Action {
    /// The action called `name` in the config.
    fn from_name(name: &str) -> Option<Action> {
        match name {
            "redact" => Some(Action::Redact),
            "block" => Some(Action::Block),
            "label" => Some(Action::Label),
            _ => None,
        }
    }
}

/// The plugin's configuration as written in the node's config (JSON).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Entity name to action name.
    #[serde(default)]
    actions: BTreeMap<String, String>,
    /// Whether to cut off an answer that contains a secret.
    #[serde(default)]
    block_secrets_in_response: bool,
}

/// The validated configuration: an action per entity, and the response rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The action for each entity, indexed by [`Entity::index`].
    actions: [Action; Entity::ALL.len()],
    /// Whether answers are scanned for secrets.
    block_secrets_in_response: bool,
}

impl Default for Policy {
    /// Secrets block (a leaked key must not leave the node even as a placeholder's neighbour, and
    /// the client should learn it sent one); everything else is redacted.
    fn default() -> Self {
        let mut actions = [Action::Redact; Entity::ALL.len()];
        actions[Entity::Secret.index()] = Action::Block;
        Policy { actions, block_secrets_in_response: false }
    }
}

impl Policy {
    /// Parses and validates a config such as
    /// `{"actions": {"email": "redact", "secret": "block", "ipv4": "label"}, "block_secrets_in_response": true}`.
    /// Entities left out keep their default; an empty config means all defaults. Unknown keys,
    /// entities or actions are errors, so that a typo does not silently weaken the filter.
    pub fn from_json(config: &str) -> Result<Policy, String> {
        if config.trim().is_empty() {
            return Ok(Policy::default());
        }
        let raw: RawConfig = serde_json::from_str(config).map_err(|e| format!("pii-redactor: invalid config: {e}"))?;
        let mut policy = Policy { block_secrets_in_response: raw.block_secrets_in_response, ..Policy::default() };
        for (entity, action) in &raw.actions {
            let e = Entity::from_name(entity).ok_or_else(|| {
                let known: Vec<&str> = Entity::ALL.iter().map(|e| e.name()).collect();
                format!("pii-redactor: unknown entity {entity:?} in actions (known: {})", known.join(", "))
            })?;
            policy.actions[e.index()] = Action::from_name(action).ok_or_else(|| {
                format!("pii-redactor: unknown action {action:?} for {entity:?} (expected redact, block or label)")
            })?;
        }
        Ok(policy)
    }

    /// The action configured for `entity`.
    pub fn action(&self, entity: Entity) -> Action {
        self.actions[entity.index()]
    }

    /// Whether answers are scanned for secrets.
    pub fn blocks_secrets_in_response(&self) -> bool {
        self.block_secrets_in_response
    }

    /// The verdict on a request's segments: a block naming the first entity (in text order) whose
    /// action is `block`, or else a label for every entity found and the values to redact.
    ///
    /// Labels say what stays in the text, as the contract's convention has it: a redacted entity is
    /// labelled `pii.<entity>.redacted`, a label-only one `pii.<entity>` (which tells routers that
    /// personal data goes out as is).
    pub fn inspect_request(&self, segments: &[Segment]) -> RequestVerdict {
        let mut seen = [false; Entity::ALL.len()];
        let mut redactions = Vec::new();
        for (index, segment) in segments.iter().enumerate() {
            for f in scan(&segment.text) {
                match self.action(f.entity) {
                    Action::Block => return RequestVerdict::Block(format!("request contains {}", f.entity.name())),
                    Action::Redact => redactions.push(Redaction {
                        segment: offset(index),
                        start: offset(f.start),
                        end: offset(f.end),
                        entity: f.entity.name().to_owned(),
                    }),
                    Action::Label => {}
                }
                seen[f.entity.index()] = true;
            }
        }
        // An entity has one action, so each gets one label. Entities are declared in the labels'
        // alphabetical order and no entity's name is a prefix of another's, so this is sorted and
        // unique with or without the suffix.
        let labels = Entity::ALL
            .iter()
            .filter(|e| seen[e.index()])
            .map(|&e| match self.action(e) {
                Action::Redact => format!("{}.redacted", e.label()),
                Action::Label | Action::Block => e.label().to_owned(),
            })
            .collect();
        RequestVerdict::Allow(Inspection { labels, redactions })
    }
}

/// A position or index as the contract's `u32`. Wasm32 addresses fit, so this fails only for a
/// native caller with a text over 4 GiB, where a panic (a trap, in the host: fail closed) is the
/// honest answer.
fn offset(n: usize) -> u32 {
    u32::try_from(n).expect("text offsets fit in u32 on wasm32")
}

/// How much of the answer seen so far is kept to find a secret split across streamed chunks (a
/// key arrives a token at a time). A JWT longer than this is found only if its parts arrive close
/// together; every other secret shape is shorter, or found from its first line (PEM).
pub const RESPONSE_WINDOW: usize = 1024;

/// The recent text of a streamed answer, scanned for secrets chunk by chunk.
#[derive(Debug, Default)]
pub struct ResponseWindow {
    /// The tail of the answer before the current chunk, starting at a word boundary.
    tail: String,
}

impl ResponseWindow {
    /// Adds the next chunk of the answer and returns the verdict on it: a block if the tail and
    /// the chunk together contain a secret.
    pub fn push(&mut self, chunk: &str) -> ResponseVerdict {
        self.tail.push_str(chunk);
        if scan(&self.tail).any(|f| f.entity == Entity::Secret) {
            return ResponseVerdict::Block("response contains secret".to_owned());
        }
        self.trim();
        ResponseVerdict::Allow
    }

    /// Keeps at most [`RESPONSE_WINDOW`] bytes, cut after whitespace so that the kept text does
    /// not start in the middle of a token (which would look like a token start to the scanner).
    fn trim(&mut self) {
        if self.tail.len() <= RESPONSE_WINDOW {
            return;
        }
        let mut cut = self.tail.len() - RESPONSE_WINDOW;
        while !self.tail.is_char_boundary(cut) {
            cut += 1;
        }
        if let Some(ws) = self.tail[cut..].find(|c: char| c.is_ascii_whitespace()) {
            cut += ws + 1;
        }
        self.tail.drain(..cut);
    }
}
