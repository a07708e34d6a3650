//! A request's place in a distributed trace (see `meridian_engine::telemetry`). With an OTLP
//! exporter (`[telemetry] otlp_endpoint`), the request is a server span continuing the client's
//! or peer edge's `traceparent` (or starting a trace), each phase of the request path a child
//! span, and each upstream attempt a client span whose id the target receives as its
//! `traceparent`; the root span ends with the request's record. Without one nothing is recorded
//! and a `traceparent` that came in goes out unchanged.

use meridian_engine::telemetry::{new_span_id, now_unix_nanos, Exporter, Span, SpanKind, TraceContext};

/// A request's trace.
pub(super) enum Trace {
    /// Not recorded: the `traceparent` that came in, passed on as it came.
    Off(Option<String>),
    /// Recorded.
    On(Box<Recorded>),
}

/// A recorded request: its span, its parent, when it started, where its spans go.
pub(super) struct Recorded {
    exporter: Exporter,
    context: TraceContext,
    parent: Option<[u8; 8]>,
    start_ns: u64,
}

/// One upstream attempt's trace: its span and the `traceparent` its target gets.
pub(super) struct Call {
    context: Option<TraceContext>,
    start_ns: u64,
    /// The `traceparent` to send.
    pub header: Option<String>,
}

impl Trace {
    /// The trace of a request that came with `incoming` (a `traceparent` value, if any).
    pub fn begin(exporter: Option<&Exporter>, incoming: Option<&str>) -> Trace {
        let Some(exporter) = exporter else { return Trace::Off(incoming.map(str::to_string)) };
        let parent = incoming.and_then(TraceContext::parse);
        let context = match parent {
            Some(p) => TraceContext { span_id: new_span_id(), ..p },
            None => TraceContext::new_root(),
        };
        Trace::On(Box::new(Recorded {
            exporter: exporter.clone(),
            context,
            parent: parent.map(|p| p.span_id),
            start_ns: now_unix_nanos(),
        }))
    }

    /// Records phase `name`, from `start_ns` to now, under the request's span.
    pub fn phase(&self, name: &'static str, start_ns: u64) {
        if let Trace::On(r) = self {
            let span = Span::ended_now(r.context.child(), Some(r.context.span_id), name, SpanKind::Internal, start_ns);
            r.exporter.export(span);
        }
    }

    /// Opens an upstream attempt.
    pub fn call(&self) -> Call {
        match self {
            Trace::Off(incoming) => Call { context: None, start_ns: 0, header: incoming.clone() },
            Trace::On(r) => {
                let context = r.context.child();
                Call { context: Some(context), start_ns: now_unix_nanos(), header: Some(context.header()) }
            }
        }
    }

    /// Records attempt `call` at `target`, ended now with `outcome` (`ok`, or the failure's kind).
    pub fn end_call(&self, call: Call, target: &str, outcome: &str) {
        if let (Trace::On(r), Some(context)) = (self, call.context) {
            let mut span = Span::ended_now(
                context,
                Some(r.context.span_id),
                format!("upstream {target}"),
                SpanKind::Client,
                call.start_ns,
            )
            .with("meridian.target", target)
            .with("meridian.outcome", outcome);
            if outcome != "ok" {
                span.error = Some(outcome.to_string());
            }
            r.exporter.export(span);
        }
    }

    /// Records the request's own span, `name`, ended now with `attributes`; `error` when it
    /// failed. Ends the recording: later calls record nothing.
    pub fn finish(&mut self, name: String, attributes: Vec<(&'static str, String)>, error: Option<String>) {
        if let Trace::On(r) = std::mem::replace(self, Trace::Off(None)) {
            let mut span = Span::ended_now(r.context, r.parent, name, SpanKind::Server, r.start_ns);
            span.attributes = attributes;
            span.error = error;
            r.exporter.export(span);
        }
    }
}
