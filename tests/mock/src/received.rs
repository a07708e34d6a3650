//! Recorded requests.

/// One request seen by the mock (kept only when recording is on).
#[derive(Clone, Debug)]
pub struct Received {
    /// The HTTP method, e.g. `"POST"`.
    pub method: String,
    /// The request path without the query string, e.g. `"/v1/messages"`.
    pub path: String,
    /// All request headers in arrival order; names are lowercase.
    pub headers: Vec<(String, String)>,
    /// The request body parsed as JSON, or `Null` if it was not valid JSON.
    pub body: serde_json::Value,
}

impl Received {
    /// The first value of header `name` (matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}
