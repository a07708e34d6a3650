-- The ledger's schema, the same text for SQLite and PostgreSQL.
CREATE TABLE IF NOT EXISTS requests (
    ts_ms BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    api TEXT NOT NULL,
    model TEXT NOT NULL,
    served_model TEXT,
    attempts TEXT NOT NULL,
    target TEXT,
    cache_hit BOOLEAN NOT NULL,
    stream BOOLEAN NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    token_source TEXT NOT NULL,
    ttft_ms DOUBLE PRECISION,
    busy_ms DOUBLE PRECISION,
    redactions BIGINT NOT NULL,
    labels TEXT NOT NULL,
    router TEXT,
    status TEXT NOT NULL,
    http_status BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    counterfactual TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts_ms);
CREATE TABLE IF NOT EXISTS standing_costs (
    from_ms BIGINT NOT NULL,
    to_ms BIGINT NOT NULL,
    target TEXT NOT NULL,
    usd DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS standing_costs_to ON standing_costs (to_ms);
