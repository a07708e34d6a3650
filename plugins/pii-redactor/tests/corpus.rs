//! Precision and recall on the labelled corpus in `corpus.json` (also read by end-to-end tests):
//! `cargo test -p pii-redactor --test corpus -- --nocapture` prints them per entity.

use pii_redactor::scan::{scan, Entity, REQUEST_TRIGGERS};
use serde::Deserialize;

/// One labelled snippet.
#[derive(Deserialize)]
struct Sample {
    /// The text.
    text: String,
    /// Every value it holds, with its entity.
    entities: Vec<Expected>,
}

/// A value a snippet holds.
#[derive(Deserialize)]
struct Expected {
    /// The entity's name.
    entity: String,
    /// The value, exactly as written in the text.
    value: String,
}

/// True positives, false positives and false negatives for one entity.
#[derive(Default, Clone, Copy)]
struct Counts {
    tp: usize,
    fp: usize,
    fn_: usize,
}

/// `num / den`, or 1 when there was nothing to count.
fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        1.0
    } else {
        num as f64 / den as f64
    }
}

#[test]
fn precision_and_recall_on_the_corpus() {
    let corpus: Vec<Sample> =
        serde_json::from_str(include_str!("../corpus.json")).expect("corpus.json is a list of samples");
    assert!(corpus.len() >= 60, "the corpus has {} samples", corpus.len());
    let mut counts = [Counts::default(); Entity::ALL.len()];
    let mut misses = Vec::new();
    for sample in &corpus {
        // The host calls the filter only for text holding one of its request triggers.
        for e in &sample.entities {
            assert!(REQUEST_TRIGGERS.iter().any(|t| e.value.contains(t)), "{:?} holds no request trigger", e.value);
        }
        // A finding counts when its exact (entity, value) is expected; each expectation once.
        let mut expected: Vec<(Entity, &str)> = sample
            .entities
            .iter()
            .map(|e| (Entity::from_name(&e.entity).expect("known entity in corpus"), e.value.as_str()))
            .collect();
        for f in scan(&sample.text) {
            let got = (f.entity, &sample.text[f.start..f.end]);
            if let Some(k) = expected.iter().position(|e| *e == got) {
                expected.swap_remove(k);
                counts[f.entity.index()].tp += 1;
            } else {
                counts[f.entity.index()].fp += 1;
                misses.push(format!("false positive {got:?} in {:?}", sample.text));
            }
        }
        for (entity, value) in expected {
            counts[entity.index()].fn_ += 1;
            misses.push(format!("false negative {:?} in {:?}", (entity, value), sample.text));
        }
    }
    println!("{:<8} {:>4} {:>4} {:>4} {:>9} {:>7}", "entity", "tp", "fp", "fn", "precision", "recall");
    let mut total = Counts::default();
    for e in Entity::ALL {
        let c = counts[e.index()];
        println!(
            "{:<8} {:>4} {:>4} {:>4} {:>9.3} {:>7.3}",
            e.name(),
            c.tp,
            c.fp,
            c.fn_,
            ratio(c.tp, c.tp + c.fp),
            ratio(c.tp, c.tp + c.fn_)
        );
        total.tp += c.tp;
        total.fp += c.fp;
        total.fn_ += c.fn_;
    }
    let precision = ratio(total.tp, total.tp + total.fp);
    let recall = ratio(total.tp, total.tp + total.fn_);
    println!("{:<8} {:>4} {:>4} {:>4} {precision:>9.3} {recall:>7.3}", "all", total.tp, total.fp, total.fn_);
    for m in &misses {
        println!("{m}");
    }
    assert!(precision >= 0.95, "precision {precision:.3} < 0.95");
    assert!(recall >= 0.95, "recall {recall:.3} < 0.95");
}
