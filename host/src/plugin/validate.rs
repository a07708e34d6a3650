//! Checks that a plugin's answer is within the contract, before anything acts on it.

use super::bindings::{Outcome, RequestVerdict, Segment, Target};

/// A router's outcome: a decision names only given targets, each once, and at least one; a
/// refusal's status is an HTTP error (400–599).
pub(crate) fn outcome(outcome: &Outcome, targets: &[Target]) -> Result<(), String> {
    match outcome {
        Outcome::Route(decision) => {
            if decision.targets.is_empty() {
                return Err("the decision names no target".into());
            }
            // Which given targets the decision has named so far. A model has a handful of targets,
            // so scanning them is cheaper than hashing every name on each request.
            let mut named = vec![false; targets.len()];
            for name in &decision.targets {
                let Some(i) = targets.iter().position(|t| t.name == *name) else {
                    return Err(format!("the decision names `{name}`, which is not one of the given targets"));
                };
                if std::mem::replace(&mut named[i], true) {
                    return Err(format!("the decision names `{name}` twice"));
                }
            }
            if decision.model_rewrite.as_deref() == Some("") {
                return Err("the model rewrite is empty".into());
            }
            Ok(())
        }
        Outcome::Reject(refusal) if !(400..=599).contains(&refusal.status) => {
            Err(format!("a refusal with status {}, outside 400–599", refusal.status))
        }
        Outcome::Reject(_) => Ok(()),
    }
}

/// A filter's request verdict: each redaction names an existing segment, a non-empty range
/// `start < end <= len` on character boundaries and a short entity name, and the ranges of a
/// segment do not overlap.
pub(crate) fn request_verdict(verdict: &RequestVerdict, segments: &[Segment]) -> Result<(), String> {
    let RequestVerdict::Allow(inspection) = verdict else { return Ok(()) };
    let mut ranges: Vec<(u32, u32, u32)> = Vec::with_capacity(inspection.redactions.len());
    for (i, r) in inspection.redactions.iter().enumerate() {
        let Some(segment) = segments.get(r.segment as usize) else {
            return Err(format!("redaction {i} names segment {}, but there are {}", r.segment, segments.len()));
        };
        let text = segment.text.as_str();
        let (start, end) = (r.start as usize, r.end as usize);
        if start >= end || end > text.len() {
            return Err(format!(
                "redaction {i} covers {start}..{end} of segment {}, which is {} bytes long",
                r.segment,
                text.len()
            ));
        }
        if !text.is_char_boundary(start) || !text.is_char_boundary(end) {
            return Err(format!("redaction {i} ({start}..{end}) splits a character of segment {}", r.segment));
        }
        // Checked here, not when the host applies it, so that the plugin is blamed (and quarantined).
        if !valid_entity(&r.entity) {
            return Err(format!("redaction {i} has an invalid entity name {:?} (want 1-32 of [a-z0-9_])", r.entity));
        }
        ranges.push((r.segment, r.start, r.end));
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let ((segment, start, end), (next_segment, next_start, next_end)) = (pair[0], pair[1]);
        if segment == next_segment && next_start < end {
            return Err(format!("redactions {start}..{end} and {next_start}..{next_end} of segment {segment} overlap"));
        }
    }
    Ok(())
}

/// Whether `entity` can name a placeholder: 1–32 of `[a-z0-9_]`, as the contract says.
pub fn valid_entity(entity: &str) -> bool {
    (1..=32).contains(&entity.len())
        && entity.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::bindings::{
        CachePolicy, Decision, Health, Inspection, Redaction, Refusal, SegmentKind, TargetKind,
    };

    fn target(name: &str) -> Target {
        Target {
            name: name.into(),
            kind: TargetKind::Managed,
            region: None,
            own_infrastructure: false,
            model: "m".into(),
            price: None,
            health: Health::Healthy,
            latency_ms: 0.0,
            ttft_ms: 0.0,
            in_flight: 0,
            capacity: None,
        }
    }

    fn route(names: &[&str]) -> Outcome {
        Outcome::Route(Decision {
            targets: names.iter().map(|n| n.to_string()).collect(),
            model_rewrite: None,
            cache: CachePolicy::Default,
        })
    }

    #[test]
    fn decisions() {
        let targets = [target("a"), target("b")];
        assert!(outcome(&route(&["b", "a"]), &targets).is_ok());
        assert!(outcome(&route(&["a"]), &targets).is_ok());
        assert!(outcome(&route(&[]), &targets).unwrap_err().contains("no target"));
        assert!(outcome(&route(&["c"]), &targets).unwrap_err().contains("`c`"));
        assert!(outcome(&route(&["a", "a"]), &targets).unwrap_err().contains("twice"));
        let reject = |status| Outcome::Reject(Refusal { status, reason: "no".into() });
        assert!(outcome(&reject(403), &targets).is_ok());
        assert!(outcome(&reject(599), &targets).is_ok());
        assert!(outcome(&reject(200), &targets).is_err());
        assert!(outcome(&reject(600), &targets).is_err());
    }

    fn verdict(redactions: &[(u32, u32, u32)]) -> RequestVerdict {
        RequestVerdict::Allow(Inspection {
            labels: vec![],
            redactions: redactions
                .iter()
                .map(|&(segment, start, end)| Redaction { segment, start, end, entity: "email".into() })
                .collect(),
        })
    }

    #[test]
    fn redactions() {
        let segments = [
            Segment { kind: SegmentKind::User, text: "é mail a@b.c".into() },
            Segment { kind: SegmentKind::System, text: "xyz".into() },
        ];
        let check = |r: &[(u32, u32, u32)]| request_verdict(&verdict(r), &segments);
        assert!(check(&[(0, 8, 13), (0, 0, 2), (1, 0, 3)]).is_ok());
        assert!(check(&[(0, 8, 13), (1, 0, 3)]).is_ok());
        assert!(check(&[(2, 0, 1)]).unwrap_err().contains("segment 2"));
        assert!(check(&[(0, 3, 3)]).is_err());
        assert!(check(&[(0, 5, 14)]).is_err());
        assert!(check(&[(0, 1, 3)]).unwrap_err().contains("splits"));
        assert!(check(&[(0, 0, 5), (0, 4, 6)]).unwrap_err().contains("overlap"));
        assert!(check(&[(0, 0, 5), (1, 0, 2)]).is_ok(), "ranges of different segments never overlap");
        assert!(request_verdict(&RequestVerdict::Block("no".into()), &segments).is_ok());
    }
}
