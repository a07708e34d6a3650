//! The configuration and the verdicts built from findings.

use meridian_plugin_sdk::{Inspection, Redaction, RequestVerdict, ResponseVerdict, Segment, SegmentKind};
use pii_redactor::policy::{Action, Policy, ResponseWindow};
use pii_redactor::scan::Entity;

/// A user segment holding `text`.
fn user(text: &str) -> Segment {
    Segment { kind: SegmentKind::User, text: text.to_owned() }
}

/// The inspection of an allowed request; panics on a block.
fn allowed(verdict: RequestVerdict) -> Inspection {
    match verdict {
        RequestVerdict::Allow(inspection) => inspection,
        RequestVerdict::Block(reason) => panic!("blocked: {reason}"),
    }
}

#[test]
fn defaults_redact_everything_but_secrets() {
    for config in ["", "  ", "{}"] {
        let policy = Policy::from_json(config).unwrap();
        assert_eq!(policy, Policy::default());
        for e in Entity::ALL {
            let want = if e == Entity::Secret { Action::Block } else { Action::Redact };
            assert_eq!(policy.action(e), want, "{e:?}");
        }
        assert!(!policy.blocks_secrets_in_response());
    }
}

#[test]
fn config_sets_actions_per_entity() {
    let policy = Policy::from_json(
        r#"{"actions": {"email": "label", "secret": "redact", "ipv4": "block"}, "block_secrets_in_response": true}"#,
    )
    .unwrap();
    assert_eq!(policy.action(Entity::Email), Action::Label);
    assert_eq!(policy.action(Entity::Secret), Action::Redact);
    assert_eq!(policy.action(Entity::Ipv4), Action::Block);
    assert_eq!(policy.action(Entity::Card), Action::Redact);
    assert!(policy.blocks_secrets_in_response());
}

#[test]
fn config_errors_are_clear() {
    let err = Policy::from_json(r#"{"actions": {"passport": "redact"}}"#).unwrap_err();
    assert!(err.contains("unknown entity \"passport\" in actions"), "{err}");
    assert!(err.contains("card, email, iban, ipv4, ipv6, phone, secret, ssn"), "{err}");
    let err = Policy::from_json(r#"{"actions": {"email": "hide"}}"#).unwrap_err();
    assert!(err.contains("unknown action \"hide\" for \"email\" (expected redact, block or label)"), "{err}");
    let err = Policy::from_json(r#"{"action": {}}"#).unwrap_err();
    assert!(err.contains("unknown field `action`"), "{err}");
    let err = Policy::from_json("{not json").unwrap_err();
    assert!(err.starts_with("pii-redactor: invalid config"), "{err}");
    let err = Policy::from_json(r#"{"block_secrets_in_response": "yes"}"#).unwrap_err();
    assert!(err.contains("invalid type"), "{err}");
}

#[test]
fn redactions_and_labels_across_segments() {
    let policy = Policy::from_json(r#"{"actions": {"ipv4": "label"}}"#).unwrap();
    let segments = [
        Segment { kind: SegmentKind::System, text: "You are helpful.".to_owned() },
        user("Mail bob@example.com from 10.0.0.1, or ring +44 20 7946 0958."),
        Segment { kind: SegmentKind::ToolResult, text: "Ünï bob@example.com".to_owned() },
    ];
    let inspection = allowed(policy.inspect_request(&segments));
    assert_eq!(inspection.labels, ["pii.email.redacted", "pii.ipv4", "pii.phone.redacted"]);
    let redaction = |segment, start, end, entity: &str| Redaction { segment, start, end, entity: entity.to_owned() };
    // Offsets are bytes (`Ünï ` is 6 of them).
    let at = |segment: usize, value: &str| {
        let start = segments[segment].text.find(value).unwrap() as u32;
        (segment as u32, start, start + value.len() as u32)
    };
    let expected = [
        (at(1, "bob@example.com"), "email"),
        (at(1, "+44 20 7946 0958"), "phone"),
        (at(2, "bob@example.com"), "email"),
    ]
    .map(|((segment, start, end), entity)| redaction(segment, start, end, entity));
    assert_eq!(inspection.redactions, expected);
    assert_eq!(expected[2].start, 6);
}

#[test]
fn labels_say_which_entities_stay_in_the_text() {
    // E-mails labelled only, phones redacted: the e-mail is still there, and its label says so.
    let policy = Policy::from_json(r#"{"actions": {"email": "label"}}"#).unwrap();
    let text = "forward this to ann.lee@example.com or call +1 (646) 555-0187";
    let inspection = allowed(policy.inspect_request(&[user(text)]));
    assert_eq!(inspection.labels, ["pii.email", "pii.phone.redacted"]);
    assert_eq!(inspection.redactions.len(), 1);
    assert_eq!(inspection.redactions[0].entity, "phone");
    // Redacted everywhere: every label has the suffix.
    let inspection = allowed(Policy::default().inspect_request(&[user(text)]));
    assert_eq!(inspection.labels, ["pii.email.redacted", "pii.phone.redacted"]);
    // Labelled everywhere: none has it.
    let policy = Policy::from_json(r#"{"actions": {"email": "label", "phone": "label"}}"#).unwrap();
    let inspection = allowed(policy.inspect_request(&[user(text)]));
    assert_eq!(inspection.labels, ["pii.email", "pii.phone"]);
    assert!(inspection.redactions.is_empty());
}

#[test]
fn a_clean_request_is_allowed_unlabelled() {
    let inspection = allowed(Policy::default().inspect_request(&[user("What is the capital of France?")]));
    assert!(inspection.labels.is_empty() && inspection.redactions.is_empty());
    assert!(allowed(Policy::default().inspect_request(&[])).labels.is_empty());
}

#[test]
fn secrets_block_by_default_naming_the_entity() {
    let verdict = Policy::default().inspect_request(&[user("a@b.co"), user("key AKIAIOSFODNN7EXAMPLE")]);
    assert_eq!(verdict, RequestVerdict::Block("request contains secret".to_owned()));
    let policy = Policy::from_json(r#"{"actions": {"card": "block"}}"#).unwrap();
    assert_eq!(
        policy.inspect_request(&[user("pay with 4111 1111 1111 1111")]),
        RequestVerdict::Block("request contains card".to_owned())
    );
}

#[test]
fn label_only_entities_are_not_redacted() {
    let policy = Policy::from_json(r#"{"actions": {"secret": "label", "ssn": "label"}}"#).unwrap();
    let inspection = allowed(policy.inspect_request(&[user("ssn 123-45-6789 and sk-abcdefghij0123456789")]));
    assert_eq!(inspection.labels, ["pii.secret", "pii.ssn"]);
    assert!(inspection.redactions.is_empty());
}

#[test]
fn response_window_finds_a_secret_split_across_chunks() {
    let mut window = ResponseWindow::default();
    for chunk in ["Your key is ", "sk-", "proj-", "abc123DEF"] {
        assert_eq!(window.push(chunk), ResponseVerdict::Allow, "{chunk}");
    }
    // The key's body reaches the 20 characters a key needs with this chunk.
    assert_eq!(window.push("456ghi789"), ResponseVerdict::Block("response contains secret".to_owned()));
}

#[test]
fn response_window_stays_bounded_and_quiet_on_plain_text() {
    let mut window = ResponseWindow::default();
    for _ in 0..2000 {
        assert_eq!(window.push("plain words and 2024 numbers, bob@example.com "), ResponseVerdict::Allow);
    }
    // A PEM block is recognised from its first line.
    assert_eq!(
        window.push("-----BEGIN PRIVATE KEY-----\nMIIEv"),
        ResponseVerdict::Block("response contains secret".to_owned())
    );
}
