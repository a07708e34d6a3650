//! Phase 5 of the request path: dispatch. The driver of the dispatch core ([`Attempts`]): it
//! sends each attempt the core asks for, records the outcome in the target's health and the
//! metrics, and hands the typed outcome back to the core, which alone decides whether the next
//! target is tried. Nothing reaches the client before a target has answered: a stream counts as
//! answered once it is past its `Start` event.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::time::Instant;

use tracing::{debug, warn};

use super::context::Exchange;
use super::respond::{Answer, Source};
use super::trace::Trace;
use super::Edge;
use crate::api::relay::Dispatch;
use crate::chat::{ChatRequest, ChatResponse, StreamEvent};
use crate::dispatch::{Admit, Attempts, Step};
use crate::error::{GatewayError, UpstreamError};
use crate::ledger::AttemptRecord;
use crate::routes::{Plan, Route};
use crate::stats::Admission;
use crate::upstream::EventStream;

/// Sends the exchange's request along the plan, streamed or whole as the client asked, and
/// returns the first answer. The exchange's record names the target that gave it.
pub(super) async fn dispatch(edge: &Edge, cx: &mut Exchange, plan: &Plan) -> Result<Answer, GatewayError> {
    let peer = cx.dispatch_for_peer();
    let (tried, trace) = (&mut cx.record.attempts, &cx.record.trace);
    if cx.request.is_stream() {
        let answered = open_stream(edge, &cx.request, plan, &peer, tried, trace).await?;
        cx.record.route(answered.route, answered.sent, answered.cold);
        let (stream, head) = answered.value;
        Ok(Answer::Stream(Source::Upstream(Box::new(stream)), head))
    } else {
        let answered = complete(edge, &cx.request, plan, &peer, tried, trace).await?;
        cx.record.route(answered.route, answered.sent, answered.cold);
        Ok(Answer::Whole(answered.value))
    }
}

/// The first answer along a plan, and what its bill depends on.
pub(super) struct FirstAnswer<'m, T> {
    /// The answer.
    pub value: T,
    /// The route that gave it.
    pub route: &'m Route,
    /// When its attempt was sent: the target is busy from here to the answer's last byte.
    pub sent: Instant,
    /// Whether the attempt found a target that scales to zero idle past its limit.
    pub cold: bool,
}

/// Drives the dispatch core along the plan with `attempt`: returns the first answer and its
/// route, or the failure the core settles on. Each attempt is appended to `tried`.
pub(super) async fn first_answer<'m, T, F, Fut>(
    edge: &Edge,
    plan: &'m Plan,
    tried: &mut Vec<AttemptRecord>,
    trace: &Trace,
    mut attempt: F,
) -> Result<FirstAnswer<'m, T>, GatewayError>
where
    F: FnMut(&'m Route, Option<String>) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let routes = &plan.model.routes;
    let mut health = LiveHealth(routes);
    let mut attempts = Attempts::new(plan.order.clone(), &health);
    let mut answer = None;
    let mut sent = (Instant::now(), false);
    loop {
        match attempts.next(&mut health) {
            Step::Try(i) => {
                let route = &routes[i];
                let started = Instant::now();
                // Only a target that scales to zero needs its idle time (a lock per attempt).
                let scale_to_zero = route.price.and_then(|p| p.scale_to_zero_after());
                let idle_since = scale_to_zero.and_then(|_| route.target.touch(started));
                let mut call = trace.call();
                let outcome = match attempt(route, call.header.take()).await {
                    Ok(value) => {
                        answer = Some(value);
                        Ok(())
                    }
                    Err(e) => {
                        warn!(target_name = %route.target.name, error = %e, "upstream attempt failed");
                        Err(e)
                    }
                };
                let retry = outcome.as_ref().map_err(UpstreamError::retry).copied();
                route.target.stats.attempt(Instant::now(), Some(started.elapsed()), retry);
                let label = outcome.as_ref().map_or_else(UpstreamError::kind, |()| "ok");
                trace.end_call(call, &route.target.name, label);
                edge.metrics.attempts.with_label_values(&[&route.target.name, label]).inc();
                tried.push(AttemptRecord {
                    target: route.target.name.clone(),
                    kind: route.target.kind.name().to_string(),
                    region: route.target.region.clone(),
                    outcome: label.to_string(),
                });
                let cold =
                    scale_to_zero.is_some_and(|idle| idle_since.is_none_or(|t| started.duration_since(t) > idle));
                sent = (started, cold);
                attempts.record(i, outcome);
            }
            Step::Answered(i) => {
                // The core answers only after an attempt recorded as answered, which set it.
                let lost =
                    || UpstreamError::Protocol { target: routes[i].target.name.clone(), message: "answer lost".into() };
                let (sent, cold) = sent;
                return answer
                    .take()
                    .map(|value| FirstAnswer { value, route: &routes[i], sent, cold })
                    .ok_or_else(|| lost().into());
            }
            Step::Failed(e) => return Err(e.into()),
        }
    }
}

/// What an attempt's target gets: `peer`, with the attempt's `traceparent` when there is one.
fn with_trace(peer: &Dispatch, traceparent: Option<String>) -> Cow<'_, Dispatch> {
    match traceparent {
        None => Cow::Borrowed(peer),
        Some(t) => Cow::Owned(Dispatch { traceparent: Some(t), ..peer.clone() }),
    }
}

/// A whole answer from the first target that gives one.
async fn complete<'m>(
    edge: &Edge,
    req: &ChatRequest,
    plan: &'m Plan,
    peer: &Dispatch,
    tried: &mut Vec<AttemptRecord>,
    trace: &Trace,
) -> Result<FirstAnswer<'m, ChatResponse>, GatewayError> {
    let max_tokens = plan.model.default_max_tokens;
    first_answer(edge, plan, tried, trace, |route, traceparent| {
        let peer = with_trace(peer, traceparent);
        async move { route.target.complete(&edge.client, req, &route.upstream_model, max_tokens, &peer).await }
    })
    .await
}

/// A stream from the first target whose stream gets past its `Start` event (to content, or to
/// its end). Until then nothing has reached the client, so a target that fails before any
/// content is skipped for the next one. Returns the events read so far with the rest of the
/// stream.
async fn open_stream<'m>(
    edge: &Edge,
    req: &ChatRequest,
    plan: &'m Plan,
    peer: &Dispatch,
    tried: &mut Vec<AttemptRecord>,
    trace: &Trace,
) -> Result<FirstAnswer<'m, (EventStream, VecDeque<StreamEvent>)>, GatewayError> {
    let max_tokens = plan.model.default_max_tokens;
    first_answer(edge, plan, tried, trace, |route, traceparent| async move {
        let peer = with_trace(peer, traceparent);
        let mut s = route.target.stream(&edge.client, req, &route.upstream_model, max_tokens, &peer).await?;
        let mut head = VecDeque::new();
        loop {
            match s.next().await {
                Some(Ok(ev)) => {
                    let begun = !matches!(ev, StreamEvent::Start { .. });
                    head.push_back(ev);
                    if begun {
                        return Ok((s, head));
                    }
                }
                Some(Err(e)) => return Err(e),
                None if head.is_empty() => {
                    return Err(UpstreamError::Protocol {
                        target: route.target.name.clone(),
                        message: "empty stream".into(),
                    })
                }
                None => return Ok((s, head)),
            }
        }
    })
    .await
}

/// The live health of a plan's targets, for the dispatch core: ejection and half-open trials as
/// their statistics say now.
struct LiveHealth<'a>(&'a [Route]);

impl Admit for LiveHealth<'_> {
    fn available(&self, i: usize) -> bool {
        self.0[i].target.stats.available(Instant::now())
    }

    fn admit(&mut self, i: usize) -> bool {
        let admitted = self.0[i].target.stats.admit(Instant::now()) != Admission::Skip;
        if !admitted {
            debug!(target_name = %self.0[i].target.name, "target ejected: skipped");
        }
        admitted
    }
}
