//! The scanner, entity by entity: positives in the formats people write, and the near misses
//! that must not match.

use pii_redactor::scan::{scan, Entity, Finding, REQUEST_TRIGGERS, SECRET_TRIGGERS};

/// The findings in `text`, as (entity name, value). Every secret must start with one of the
/// triggers the filter declares for answers, or the host would not show it that answer; every
/// finding must hold one of those it declares for requests, or the host would not call it.
fn found(text: &str) -> Vec<(&'static str, &str)> {
    let findings: Vec<_> = scan(text).map(|f| (f.entity.name(), &text[f.start..f.end])).collect();
    for (entity, value) in &findings {
        if *entity == "secret" {
            assert!(SECRET_TRIGGERS.iter().any(|t| value.starts_with(t)), "{value:?} starts with no trigger");
        }
        assert_holds_a_request_trigger(value);
    }
    findings
}

fn assert_holds_a_request_trigger(value: &str) {
    assert!(REQUEST_TRIGGERS.iter().any(|t| value.contains(t)), "{value:?} holds no request trigger");
}

/// Asserts that each value, put in a sentence, is found whole as `entity` and nothing else.
fn assert_all(entity: &str, values: &[&str]) {
    for v in values {
        let text = format!("see {v}, thanks");
        assert_eq!(found(&text), vec![(entity, *v)], "in {text:?}");
    }
}

/// Asserts that nothing is found in each text.
fn assert_none(texts: &[&str]) {
    for t in texts {
        assert_eq!(found(t), vec![], "in {t:?}");
    }
}

#[test]
fn emails() {
    assert_all(
        "email",
        &[
            "alice@example.com",
            "john.doe+newsletter@mail.example.co.uk",
            "first_last@sub.domain.org",
            "user%relay@example.net",
            "12345@numbers.io",
            "o'x@example.com".split('\'').nth(1).unwrap(),
            "ops-team@xn--bcher-kva.example",
            "Mixed.Case@Example.COM",
        ],
    );
    assert_eq!(found("<bob@example.io>"), vec![("email", "bob@example.io")]);
    assert_eq!(found("mail bob@example.io."), vec![("email", "bob@example.io")]);
    assert_eq!(found("to='carol@example.org'"), vec![("email", "carol@example.org")]);
    assert_none(&[
        "@handle on social",
        "foo@bar without a dot",
        "a@b.c has a one-letter tld",
        "user@localhost",
        "double..dot@example.com",
        "dot.@example.com",
        "x@-bad.example.com",
        "name@example.com_suffix",
        "a@b.com@c.org",
    ]);
}

#[test]
fn phones() {
    assert_all(
        "phone",
        &[
            "+1 415 555 0132",
            "+1-415-555-0132",
            "+1.415.555.0132",
            "+14155550132",
            "+1 (415) 555-0132",
            "+44 20 7946 0958",
            "+44 (0)20 7946 0958",
            "+49 30 12345678",
            "+49 171 1234567",
            "+33 6 12 34 56 78",
            "+81 3-1234-5678",
            "(415) 555-0132",
            "(415)555-0132",
            "415-555-0132",
            "415.555.0132",
            "415 555 0132",
            "1-800-555-0199",
            "020 7946 0958",
            "07700 900123",
            "0161 496 0000",
            "030 12345678",
            "030/12345678",
            "(030) 1234 5678",
            "0171 1234567",
            "01 23 45 67 89",
            "06.12.34.56.78",
            "0049 171 2345678",
            // A trunk `(0)` after the country code, written as the UK, Germany and the
            // Netherlands do.
            "+49(0)1489 364390",
            "+49 (0) 9141 777631",
            "+31(0)99-6393217",
            "+44(0)2074960074",
            "+33 (0)1 41 63 60 83",
            // Extensions.
            "001-331-894-8757x491",
            "(578)849-7740x353",
            "+1-780-563-6083x7783",
            "415-555-0132 ext. 12",
            "415.555.0132 x 9",
            // Any area code in the North American shape, and a leading 1.
            "106-690-7439",
            "1 (786) 834-4978",
            // Trunk-prefixed, unbroken or with the area code in parentheses.
            "0222433377",
            "03217812850",
            "0049171234567",
            "(0161) 4960066",
            "(0406)-812415",
            "(07700)900123",
        ],
    );
    // Seven digits are too many for an extension: the number ends before it.
    assert_eq!(found("415-555-0132 x1234567"), vec![("phone", "415-555-0132")]);
    // A count after the number is not part of it.
    assert_eq!(found("call 020 7946 0958 2 times"), vec![("phone", "020 7946 0958")]);
    assert_none(&[
        "founded in 2024",
        "costs $1,299.99 or 1299,99 EUR",
        "order 123456789012 shipped",
        "order #12345-67890",
        "on 2024-01-15 at 10:30:45",
        "on 12/25/2024 and 01.02.2024 12:30",
        "ISBN 978-3-16-148410-0",
        "+1234.56 points",
        "+5 (again)",
        "415-555-01320 is too long",
        "415-555-0132-7 is an extension-less id",
        "4155550132 without separators",
        "12345678 plain",
        "0 800 123 is too short",
        "a+14155550132",
        "022243337 is nine digits",
        "02224333771234 is fourteen",
        "invoice JN-0431-810665",
        "415-555-0132x is not an extension",
    ]);
}

#[test]
fn plain_phone_numbers_need_context() {
    let found_phone = |text: &str, value: &str| assert_eq!(found(text), vec![("phone", value)], "in {text:?}");
    found_phone("call me at 4155550132", "4155550132");
    found_phone("Telefon: 3420837783", "3420837783");
    found_phone("cellulare 35098683498", "35098683498");
    found_phone("tel. 884 414 724. 70 more", "884 414 724");
    found_phone("Zadzwoń pod 609 141 777", "609 141 777");
    found_phone("teléfono: 609141777", "609141777");
    found_phone("Handy 0171-1234567", "0171-1234567");
    assert_none(&[
        // No context: order ids, timestamps, amounts written in groups.
        "order 4155550132",
        "ts=1364806615",
        "total 609 141 777 units",
        // Context, but too short, too long, or mixed separators.
        "call 12345678",
        "call 1234567890123",
        "call 609 141-777",
        // Context too far before the number.
        "Call me tomorrow about the delivery of order 4155550132",
    ]);
}

#[test]
fn cards() {
    assert_all(
        "card",
        &[
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "5555555555554444",
            "5555 5555 5555 4444",
            "2223003122003222",
            "378282246310005",
            "3782 822463 10005",
            "371449635398431",
            "6011111111111117",
            "6011 0009 9013 9424",
            "3530111333300000",
            "4012888888881881",
            "4222222222222",
            // Maestro issues 12 digits; JCB's 1800 and 2131 ranges 15; Visa 19.
            "501811524492",
            "6759 8400 5750",
            "180001952642023",
            "213150781975749",
            "4464802066218131105",
            "30585138936608",
        ],
    );
    assert_eq!(found("card 4111 1111 1111 1111 2024"), vec![("card", "4111 1111 1111 1111")]);
    assert_none(&[
        "4111111111111112 fails Luhn",
        "4111 1111 1111 1112",
        "4111-1111 1111-1111 mixes separators",
        "9111111111111119 has no network",
        "41111111111111111111 is too long",
        "4111-1111-1111-1111-2 continues",
        "id 1234567890123452",
        // Luhn-valid, but a length the prefix's network does not issue.
        "411111111117 is a 12-digit Visa",
        "555555555559 is a 12-digit Mastercard",
        "34000000000000 is a 14-digit Amex",
        "x4111111111111111",
    ]);
}

#[test]
fn ibans() {
    assert_all(
        "iban",
        &[
            "DE89370400440532013000",
            "DE89 3704 0044 0532 0130 00",
            "GB82WEST12345698765432",
            "GB82 WEST 1234 5698 7654 32",
            "FR1420041010050500013M02606",
            "FR14 2004 1010 0505 0001 3M02 606",
            "ES9121000418450200051332",
            "IT60X0542811101000000123456",
            "NL91ABNA0417164300",
            "NL91 ABNA 0417 1643 00",
            "CH9300762011623852957",
            "BE68539007547034",
            "AT611904300234573201",
            "PL61109010140000071219812874",
            "NO9386011117947",
        ],
    );
    // A following word in capitals is not one more group.
    assert_eq!(found("pay ES91 2100 0418 4502 0005 1332 THEN stop"), vec![("iban", "ES91 2100 0418 4502 0005 1332")]);
    assert_none(&[
        "DE89370400440532013001 bad checksum",
        "DE89 3704 0044 0532 0130 01",
        "DE8937040044053201300 too short for DE",
        "GB82WEST1234569876543",
        "DE00370400440532013000 check digits 00",
        "XDE89370400440532013000",
        "DE89 370 4004 4053 2013 000 badly grouped",
    ]);
}

#[test]
fn ssns() {
    assert_all("ssn", &["123-45-6789", "078-05-1120", "219-09-9999", "899-99-9998"]);
    assert_none(&[
        "666-12-3456",
        "000-12-3456",
        "900-12-3456",
        "987-65-4321",
        "123-00-4567",
        "123-45-0000",
        "123-45-67890",
        "1123-45-6789",
        "123 45 6789",
        "2024-12-3456",
        "x123-45-6789",
        "123-45-6789-1",
    ]);
}

#[test]
fn ssns_without_dashes_need_context() {
    // After a context word (any case, up to 24 bytes before): nine digits or spaced groups.
    let found_ssn = |text: &str, value: &str| assert_eq!(found(text), vec![("ssn", value)], "in {text:?}");
    found_ssn("SSN 536228412 (typed without dashes)", "536228412");
    found_ssn("ssn: 536 22 8412", "536 22 8412");
    found_ssn("My social security number is 219451192.", "219451192");
    found_ssn("Social-Security no. 078051120", "078051120");
    found_ssn("soc sec #457555462", "457555462");
    found_ssn("customer_ssn=772183390", "772183390");
    found_ssn("{\"customerSsn\": \"772183390\"}", "772183390");
    found_ssn("SSNs on file: 536228412", "536228412");
    // The dashed form needs none.
    found_ssn("applicant 536-22-8412", "536-22-8412");
    assert_none(&[
        // No context: order ids, amounts, spaced groups.
        "order 536228412 shipped",
        "536228412",
        "total 536 22 8412",
        "123 45 6789",
        // Context, but never issued: area 000, 666, 9xx; group 00; serial 0000.
        "SSN 000228412",
        "SSN 666228412",
        "SSN 912345678",
        "ssn 536008412",
        "ssn 536220000",
        "SSN 666 22 8412",
        // Context, but the wrong length or part of something longer.
        "SSN 53622841",
        "SSN 5362284120",
        "SSN 536228412.50",
        "SSN 536-228412",
        "SSN 536 228412",
        "SSN x536228412",
        // Context after the number, too far before it, or inside another word.
        "536228412 is not an SSN",
        "SSN on file was verified; reference number 536228412",
        "lessn 536228412",
        "classnote 536228412",
    ]);
}

#[test]
fn local_phones_need_context() {
    let found_phone = |text: &str, value: &str| assert_eq!(found(text), vec![("phone", value)], "in {text:?}");
    found_phone("Call me at 555-0132 after six.", "555-0132");
    found_phone("phone: 867 5309", "867 5309");
    found_phone("Tel. 283.0147", "283.0147");
    found_phone("TELEPHONE 555-0132", "555-0132");
    found_phone("mobile 555-0132", "555-0132");
    found_phone("cell: 555-0132", "555-0132");
    found_phone("fax 555-0132", "555-0132");
    found_phone("text me on 555-0132", "555-0132");
    found_phone("reach me at 555-0132", "555-0132");
    found_phone("Ring the front desk on 555-0132", "555-0132");
    found_phone("calls go to 555-0132", "555-0132");
    found_phone("{\"phoneNumber\":\"555-0132\"}", "555-0132");
    // A full number is still read whole after a context word.
    found_phone("call 415-555-0132", "415-555-0132");
    assert_none(&[
        // No phone context.
        "invoice 555-0132",
        "ticket 555-0132 is closed",
        "555-0132",
        // Context, but not the shape: N is 2–9, no N11 service code, exactly 3 + 4 digits.
        "call 155-0132",
        "call 055-0132",
        "call 911-0132",
        "call 411 0132",
        "call 55-0132",
        "call 5555-0132",
        "call 555-01320",
        "call 555-013",
        "call 555/0132",
        "call 5550132",
        // Context, but part of a longer number, a date or a version.
        "call 555-0132-7",
        "call 555-0132.5",
        "call 1-555-0132",
        "call 2.555-0132",
        "call x555-0132",
        // Context after the number, too far before it, or inside another word.
        "555-0132 is the number to call",
        "Call me tomorrow about the invoice 555-0132",
        "string 555-0132",
        "recall 555-0132",
        "hotel 555-0132",
        "Excellent 555-0132",
    ]);
}

#[test]
fn ipv4() {
    assert_all("ipv4", &["192.168.1.1", "10.0.0.1", "8.8.8.8", "255.255.255.255", "172.16.254.3"]);
    assert_eq!(found("connect to 10.0.0.1:8080 now"), vec![("ipv4", "10.0.0.1")]);
    assert_eq!(found("range 10.0.0.1-10.0.0.9"), vec![("ipv4", "10.0.0.1"), ("ipv4", "10.0.0.9")]);
    assert_eq!(found("net 192.168.0.0/16"), vec![("ipv4", "192.168.0.0")]);
    assert_none(&[
        "256.1.1.1",
        "1.2.3.4.5",
        "v1.2.3.4",
        "build 10.0.19045.2965",
        "192.168.1",
        "1.2.3.4a",
        "1234.1.1.1",
        "1.2.3.1000",
        "12.05.2024",
    ]);
}

#[test]
fn ipv6() {
    assert_all(
        "ipv6",
        &[
            "2001:db8::1",
            "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
            "fe80::1ff:fe23:4567:890a",
            "::1",
            "::ffff:192.0.2.128",
            "2001:db8::",
            "FE80::0202:B3FF:FE1E:8329",
            "64:ff9b::192.0.2.33",
        ],
    );
    assert_eq!(found("[2001:db8::8a2e:370:7334]:443"), vec![("ipv6", "2001:db8::8a2e:370:7334")]);
    assert_none(&[
        "at 10:30:45 today",
        "use std::vec::Vec",
        "dead::beef",
        "mac 00:1A:2B:3C:4D:5E",
        "1::2::3",
        "2001:db8:0:0:0:0:0:0:1",
        "12345::1",
        "::",
        "ratio 1:2",
    ]);
}

#[test]
fn secrets() {
    let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
    assert_all(
        "secret",
        &[
            "sk-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH",
            "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z_A-b",
            "sk-ant-api03-AbCdEf0123456789_ghIJklMNopQRstUVwx-yz012345AA",
            "AKIAIOSFODNN7EXAMPLE",
            "ASIAY34FZKBOKMUTVV7A",
            "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "gho_16C7e42F292c6912E7710c838347Ae178B4a",
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123",
            "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
            "xoxp-1234567890-abcdefABCDEF",
            jwt,
        ],
    );
    assert_eq!(
        found(&format!("OPENAI_API_KEY={}", "sk-abcdefghij0123456789")),
        vec![("secret", "sk-abcdefghij0123456789")]
    );
    assert_eq!(found(&format!("Authorization: Bearer {jwt}")), vec![("secret", jwt)]);
    assert_none(&[
        "task-sk-abcdefghij0123456789xyz",
        "sk-short1",
        "sk-this-is-not-a-real-key-at-all",
        "AKIA1234",
        "AKIAIOSFODNN7EXAMPLEX",
        "ghp_short123",
        "xoxb-",
        "eyJhbGciOiJIUzI1NiJ9 alone",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.",
        "the word sky-high",
    ]);
}

#[test]
fn pem_private_keys() {
    let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\naFDrBz9vFqU4yEDaG5KhOi8LGnVfNvOZfwx+mCOL2I0jOZMy\n-----END RSA PRIVATE KEY-----";
    let text = format!("here is my key:\n{key}\nplease fix it");
    assert_eq!(found(&text), vec![("secret", key)]);
    let openssh = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ==\n-----END OPENSSH PRIVATE KEY-----";
    assert_eq!(found(openssh), vec![("secret", openssh)]);
    // A truncated key is still a key: everything from BEGIN on.
    let truncated = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC";
    assert_eq!(found(&format!("x {truncated}")), vec![("secret", truncated)]);
    // The END line must name the same key.
    let mismatched = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----";
    assert_eq!(found(mismatched), vec![("secret", mismatched)]);
    assert_none(&[
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
        "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----",
    ]);
}

#[test]
fn uuids_and_hashes_are_not_values() {
    assert_none(&[
        "request 550e8400-e29b-41d4-a716-446655440000 failed",
        "id 123e4567-e89b-12d3-a456-426614174000",
        "commit 6d484f6a1b2c3d4e5f60718293a4b5c6d7e8f901",
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ]);
}

#[test]
fn non_ascii_text_around_values() {
    let text = "Ünïcödé → alice@example.com ← 日本語+81 3-1234-5678です。电话：13800138000，IP：192.168.0.1，卡号4111111111111111。Grüße, Zoë";
    let got = found(text);
    assert_eq!(
        got,
        vec![
            ("email", "alice@example.com"),
            ("phone", "+81 3-1234-5678"),
            ("ipv4", "192.168.0.1"),
            ("card", "4111111111111111")
        ]
    );
    assert_invariants(text);
}

/// Checks what every scan must satisfy: findings are non-empty, in order, disjoint, and on
/// character boundaries.
fn assert_invariants(text: &str) {
    let findings: Vec<Finding> = scan(text).collect();
    let mut last_end = 0;
    for f in &findings {
        assert!(f.start < f.end, "empty finding {f:?} in {text:?}");
        assert!(f.start >= last_end, "overlap at {f:?} in {text:?}");
        assert!(text.is_char_boundary(f.start) && text.is_char_boundary(f.end), "{f:?} splits a char in {text:?}");
        assert_holds_a_request_trigger(&text[f.start..f.end]);
        last_end = f.end;
    }
}

#[test]
fn findings_never_overlap_on_generated_text() {
    // Random text from fragments chosen to collide: digits, separators, prefixes, non-ASCII.
    const PIECES: [&str; 28] = [
        "4111",
        "1111",
        " ",
        "-",
        ".",
        ":",
        "::",
        "@",
        "example",
        ".com",
        "+44",
        "(0)",
        "20",
        "7946",
        "0958",
        "DE89",
        "3704",
        "sk-",
        "abc123DEF456ghi789JKL",
        "eyJ",
        "é",
        "日本",
        "192",
        "168",
        "ffff",
        "_",
        "\n",
        "-----BEGIN ",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..3000 {
        let mut text = String::new();
        for _ in 0..24 {
            // xorshift64: a fixed, dependency-free sequence.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            text.push_str(PIECES[(state % PIECES.len() as u64) as usize]);
        }
        assert_invariants(&text);
    }
}

#[test]
fn pathological_inputs_finish() {
    // Each would be quadratic if detectors restarted inside runs; here they must simply finish.
    let inputs = [
        "sk-".repeat(20_000),
        "a.".repeat(30_000),
        "1.".repeat(30_000),
        ":".repeat(60_000),
        "1-".repeat(30_000),
        "eyJ-".repeat(15_000),
        "-----BEGIN RSA PRIVATE KEY-----".repeat(2_000),
        "x@".repeat(30_000),
        "0 ".repeat(30_000),
        // Context words and weak candidates everywhere: each look-back is bounded.
        "call 555-0132 ".repeat(5_000),
        "ssn 536228412 ".repeat(5_000),
        "call ssn 555-01 53622841 ".repeat(3_000),
    ];
    for text in &inputs {
        assert_invariants(text);
    }
}

#[test]
fn entity_names_round_trip() {
    for e in Entity::ALL {
        assert_eq!(Entity::from_name(e.name()), Some(e));
        assert_eq!(e.label(), format!("pii.{}", e.name()));
    }
    let mut labels: Vec<&str> = Entity::ALL.iter().map(|e| e.label()).collect();
    let declared = labels.clone();
    labels.sort_unstable();
    assert_eq!(labels, declared, "entities are declared in label order");
    assert_eq!(Entity::from_name("passport"), None);
}

#[test]
fn json_escapes_separate_words() {
    // Tool arguments are JSON: `\n` stands for a newline, not for a word ending in `n`.
    let text = r#"{"body":"Hi\nalice@example.com\n+1 415 555 0132\tAKIAIOSFODNN7EXAMPLE\r\n4111111111111111"}"#;
    assert_eq!(
        found(text),
        vec![
            ("email", "alice@example.com"),
            ("phone", "+1 415 555 0132"),
            ("secret", "AKIAIOSFODNN7EXAMPLE"),
            ("card", "4111111111111111")
        ]
    );
    let key = r"-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn\n-----END RSA PRIVATE KEY-----";
    assert_eq!(found(&format!(r#"{{"pem":"x\n{key}"}}"#)), vec![("secret", key)]);
    // Only those escapes: `\u` or a plain `n` still glue.
    assert_none(&[r"x\u0041alice@example", "nalice@example"]);
}

/// `text` with `pad` spaces in front, so that a value falls at every offset of the scanner's
/// eight-byte blocks.
fn padded(pad: usize, text: &str) -> String {
    format!("{}{text}", " ".repeat(pad))
}

#[test]
fn values_are_found_at_every_block_offset() {
    // The scanner reads eight bytes at a time: values, escapes and the `@` or `:` that let any
    // letter start a value must count wherever they fall in a block, and across two.
    let cases: &[(&str, Vec<(&str, &str)>)] = &[
        ("mail to mary@example.org now", vec![("email", "mary@example.org")]),
        ("ab@x.io then zed.q@example.com", vec![("email", "ab@x.io"), ("email", "zed.q@example.com")]),
        (r"x\tlisa@example.com", vec![("email", "lisa@example.com")]),
        (r"k\nsk-proj-a1B2c3D4e5F6g7H8i9J0kLmN", vec![("secret", "sk-proj-a1B2c3D4e5F6g7H8i9J0kLmN")]),
        ("host fe80::1ff:fe23:4567:890a up", vec![("ipv6", "fe80::1ff:fe23:4567:890a")]),
        ("addr dead:beef::1 up", vec![("ipv6", "dead:beef::1")]),
        ("paid GB82 WEST 1234 5698 7654 32 today", vec![("iban", "GB82 WEST 1234 5698 7654 32")]),
        (
            "id ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 ok",
            vec![("secret", "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789")],
        ),
        ("card 4111 1111 1111 1111 x12", vec![("card", "4111 1111 1111 1111")]),
        ("order 4411 paid", vec![]),
        ("Call me at 555-0132 today", vec![("phone", "555-0132")]),
    ];
    for pad in 0..16 {
        for (text, want) in cases {
            let text = padded(pad, text);
            assert_eq!(found(&text), *want, "in {text:?}");
        }
    }
}

#[test]
fn a_card_loses_only_to_a_longer_phone_number() {
    // A 12-digit Maestro number is also a contextual phone shape: the phone number wins only when
    // it reads on past the card, into an extension; one that ends where the card does never
    // replaces it.
    assert_eq!(found("call 5000 0000 0009 x12"), vec![("phone", "5000 0000 0009 x12")]);
    assert_eq!(found("call 5000 0000 0009 ext. 4"), vec![("phone", "5000 0000 0009 ext. 4")]);
    assert_eq!(found("call 5000 0000 0009"), vec![("card", "5000 0000 0009")]);
    assert_eq!(found("4111 1111 1111 1111 ext. 12"), vec![("card", "4111 1111 1111 1111")]);
    assert_eq!(found("4111-1111-1111-1111 ok"), vec![("card", "4111-1111-1111-1111")]);
}

#[test]
fn punctuation_after_a_word_starts_nothing() {
    // A `-`, `+`, `(` or `:` right after a word is inside a token, not at a word start.
    assert_none(&["xox-----BEGIN RSA PRIVATE KEY-----\nabc", "a+44 20 7946 0958", "f(415) 555-0132"]);
}
