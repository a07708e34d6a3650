//! Embeddings from the real all-MiniLM-L6-v2: unit vectors, similar sentences closer than unrelated
//! ones, a batch equal to one-by-one, and a large request read in runs of bounded size.

use crate::common::*;
use meridian_engine::api::{Backend, EmbedRequest, ErrorCode};
use meridian_engine::config::SchedulerConfig;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[tokio::test]
async fn embeddings() {
    let engine = engine(&[("minilm", MINILM), ("smol", INT4)], Default::default());
    let texts = [
        "A cat sits on the mat.",
        "A kitten is sitting on a rug.",
        "The stock market fell sharply on Tuesday after the interest rate decision.",
    ];
    let req = |input: Vec<String>| EmbedRequest::new("minilm", input);
    let all = embed_all(&engine, req(texts.iter().map(|t| t.to_string()).collect())).await.unwrap();
    assert_eq!(all.data.len(), 3);
    assert!(all.prompt_tokens > 10);
    for v in &all.data {
        assert_eq!(v.len(), 384);
        assert!((dot(v, v) - 1.0).abs() < 1e-4, "not unit length");
    }
    let (cat, kitten, market) = (&all.data[0], &all.data[1], &all.data[2]);
    assert!(dot(cat, kitten) > dot(cat, market) + 0.2, "{} vs {}", dot(cat, kitten), dot(cat, market));
    for (t, batched) in texts.iter().zip(&all.data) {
        let one = embed_all(&engine, req(vec![t.to_string()])).await.unwrap();
        let diff = max_diff(&one.data[0], batched);
        assert!(diff < 1e-4, "{t:?}: batched differs from alone by {diff}");
    }
    // Longer than max_length (256): truncated, not an error.
    let long = embed_all(&engine, req(vec!["word ".repeat(1000)])).await.unwrap();
    assert_eq!(long.prompt_tokens, 256);
    let wrong = engine.embed(EmbedRequest::new("smol", vec!["x".into()])).unwrap_err();
    assert_eq!(wrong.code, ErrorCode::UnknownModel);
    assert_eq!(engine.health().embedding_models, vec!["minilm".to_string()]);
}

#[tokio::test]
async fn a_large_request_is_read_in_runs_of_bounded_texts_and_tokens() {
    let scheduler = SchedulerConfig { embed_max_batch: 16, embed_max_batch_tokens: 300, ..Default::default() };
    let engine = engine(&[("minilm", MINILM)], scheduler);
    // A few tokens each: embedding is compute bound, and 2 048 long sentences take minutes on CPU.
    let topics = ["cat", "sea", "market", "hill"];
    let mut texts: Vec<String> = (0..2048).map(|i| format!("{} {i}", topics[i % 4])).collect();
    // 256 tokens after truncation: with any other text it would pass the token limit, so it runs
    // alone.
    texts[100] = "word ".repeat(1000);

    let mut parts = engine.embed(EmbedRequest::new("minilm", texts.clone())).unwrap();
    let mut vectors = Vec::new();
    let mut runs = Vec::new();
    while let Some(part) = parts.recv().await {
        let part = part.unwrap();
        assert_eq!(part.index as usize, vectors.len(), "parts come in input order");
        runs.push((part.index as usize, part.data.len()));
        vectors.extend(part.data);
    }
    assert_eq!(vectors.len(), 2048);
    assert!(runs.iter().all(|&(_, n)| (1..=16).contains(&n)), "no run over 16 texts: {runs:?}");
    assert!(runs.contains(&(100, 1)), "the long text ran alone: {runs:?}");
    assert!(runs.iter().any(|&(start, _)| start == 101), "and the next run starts after it: {runs:?}");

    // The same vectors as smaller requests give.
    for i in [0, 1, 99, 100, 101, 1000, 2047] {
        let one = embed_all(&engine, EmbedRequest::new("minilm", vec![texts[i].clone()])).await.unwrap();
        let diff = max_diff(&one.data[0], &vectors[i]);
        assert!(diff < 1e-4, "text {i}: differs from alone by {diff}");
    }
    let some = embed_all(&engine, EmbedRequest::new("minilm", texts[1500..1540].to_vec())).await.unwrap();
    for (k, v) in some.data.iter().enumerate() {
        assert!(max_diff(v, &vectors[1500 + k]) < 1e-4, "text {}", 1500 + k);
    }
}
