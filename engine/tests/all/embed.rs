//! Embeddings from the real all-MiniLM-L6-v2: unit vectors, similar sentences closer than unrelated
//! ones, a batch equal to one-by-one.

use crate::common::*;
use meridian_engine::api::{Backend, EmbedRequest, ErrorCode};

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test]
async fn embeddings() {
    let engine = engine(&[("minilm", MINILM), ("smol", INT4)], Default::default());
    let texts = [
        "A cat sits on the mat.",
        "A kitten is sitting on a rug.",
        "The stock market fell sharply on Tuesday after the interest rate decision.",
    ];
    let req = |input: Vec<String>| EmbedRequest { model: "minilm".into(), input };
    let all = engine.embed(req(texts.iter().map(|t| t.to_string()).collect())).await.unwrap();
    assert_eq!(all.data.len(), 3);
    assert!(all.prompt_tokens > 10);
    for v in &all.data {
        assert_eq!(v.len(), 384);
        assert!((dot(v, v) - 1.0).abs() < 1e-4, "not unit length");
    }
    let (cat, kitten, market) = (&all.data[0], &all.data[1], &all.data[2]);
    assert!(dot(cat, kitten) > dot(cat, market) + 0.2, "{} vs {}", dot(cat, kitten), dot(cat, market));
    for (t, batched) in texts.iter().zip(&all.data) {
        let one = engine.embed(req(vec![t.to_string()])).await.unwrap();
        let diff = one.data[0].iter().zip(batched).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "{t:?}: batched differs from alone by {diff}");
    }
    // Longer than max_length (256): truncated, not an error.
    let long = engine.embed(req(vec!["word ".repeat(1000)])).await.unwrap();
    assert_eq!(long.prompt_tokens, 256);
    let wrong = engine.embed(EmbedRequest { model: "smol".into(), input: vec!["x".into()] }).await.unwrap_err();
    assert_eq!(wrong.code, ErrorCode::UnknownModel);
    assert_eq!(engine.health().embedding_models, vec!["minilm".to_string()]);
}
