//! Prometheus metrics through the `metrics` facade. The recorder is installed
//! once per process (tests run many servers in one process and share it);
//! `/metrics` on every role renders it. Metric names are listed, with their
//! meaning and what to alert on, in docs/OPERATIONS.md.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Buckets for latencies measured in seconds, from 100µs to 10s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Install the process-wide recorder (idempotent) and return its handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("bucket list is non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding application);
        // then our handle renders only what we describe, which is still valid text.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a global metrics recorder was already installed; /metrics may be empty"
            );
        }
        describe();
        handle
    })
}

pub fn render() -> String {
    install().render()
}

/// Every metric the roles export: its kind, name and help text. `/metrics`
/// describes each; the tests below check that every metric the code records
/// is listed here and in docs/OPERATIONS.md.
const METRICS: &[(Kind, &str, &str)] = &[
    (Counter, "marketcast_writer_requests_total", "Writer HTTP requests by route and status."),
    (Histogram, "marketcast_writer_request_seconds", "Writer HTTP request latency."),
    (Histogram, "marketcast_writer_batch_size", "Trades per writer transaction."),
    (Gauge, "marketcast_ws_connections", "Open WebSocket connections."),
    (Gauge, "marketcast_subscriptions", "Active market subscriptions over all connections."),
    (Gauge, "marketcast_hub_markets", "Markets with at least one subscriber in this broadcaster."),
    (Counter, "marketcast_token_expired_closes_total", "WebSocket connections closed with 4001 because their token expired without a refresh."),
    (Gauge, "marketcast_sse_streams", "Open SSE streams (GET /v1/markets/{id}/stream)."),
    (Gauge, "marketcast_long_polls_waiting", "GET /v1/markets/{id}/trades requests waiting for a trade."),
    (Counter, "marketcast_http_reads_total", "Answers of the broadcaster's HTTP read routes, by route (stream, trades) and status."),
    (Counter, "marketcast_heads_sent_total", "head messages sent to subscriptions that asked for heads."),
    (Counter, "marketcast_ticker_frames_sent_total", "ticker frames sent (shared group frames and per-connection folds)."),
    (Counter, "marketcast_ws_frames_sent_total", "WebSocket frames written to clients."),
    (Counter, "marketcast_ws_bytes_sent_total", "Bytes written to WebSocket clients."),
    (Counter, "marketcast_ws_writes_total", "Socket writes (each coalesces one or more frames)."),
    (Counter, "marketcast_notifications_total", "Notifications received on the LISTEN connection."),
    (Counter, "marketcast_notifications_rejected_total", "Notifications whose payload was not a valid doorbell (logged, never delivered)."),
    (Counter, "marketcast_notification_outcomes_total", "Notifications by outcome: published (a signed trade published from its payload, no log read), duplicate (signed, at or below the head), gap, stale_epoch, doorbell (plain: older trigger or the 8000-byte fallback), bad_mac, unknown_key, malformed (all read from the log when followed), not_followed, rejected (not a doorbell)."),
    (Counter, "marketcast_log_reads_total", "Reads of new trades from the log triggered by doorbells or reconciles."),
    (Counter, "marketcast_trades_published_total", "Trades published by the hub to live subscribers."),
    (Counter, "marketcast_replayed_trades_total", "Trades sent to catch a subscriber up, by source (memory, replica, or postgres: the primary)."),
    (Gauge, "marketcast_replica_up", "1 while replays may read the --replay-database-url replica (reachable, in recovery, a standby of this database), else 0."),
    (Counter, "marketcast_replica_fallbacks_total", "Replay reads sent to the primary because the replica lagged past --replica-wait or failed."),
    (Counter, "marketcast_gaps_repaired_total", "Trades a repair read (a reconcile, or the re-read after LISTEN is re-established) found that no notification had announced: lost notifications, repaired."),
    (Counter, "marketcast_slow_consumer_closes_total", "Connections closed with 4000 because they could not keep up."),
    (Counter, "marketcast_listen_reconnects_total", "Times LISTEN was re-established after the connection was lost (attempts are not counted)."),
    (Gauge, "marketcast_listen_up", "1 while the LISTEN connection is established, else 0."),
    (Gauge, "marketcast_notify_queue_usage", "pg_notification_queue_usage(): fraction of the cluster's NOTIFY queue in use."),
    (Histogram, "marketcast_commit_to_send_seconds", "Time from a trade's created_at (stamped by the trigger inside the inserting transaction, so commit latency included) to the hub publishing it to live subscribers."),
    (Counter, "marketcast_client_errors_total", "Error replies sent to WebSocket clients, by code."),
    (Gauge, "marketcast_open_connections", "Open TCP connections of the HTTP servers (WebSockets included), counted against --max-open-connections."),
    (Counter, "marketcast_connections_refused_total", "Connections closed at accept because --max-open-connections were open."),
    (Counter, "marketcast_ws_origin_refused_total", "WebSocket upgrades refused with 403 by --allowed-origins / --require-origin."),
    (Gauge, "marketcast_registry_live_broadcasters", "Live broadcaster registry entries, this one included, sampled every --registry-interval (broadcaster with --advertise-url)."),
    (Gauge, "marketcast_registry_unserved_shards", "Shards of the stored shard count that no live registry entry serves (broadcaster with --advertise-url)."),
    (Counter, "marketcast_registry_heartbeat_failures_total", "Registry heartbeats that did not reach the database: failed, or not sent while the broadcaster was unhealthy (broadcaster with --advertise-url)."),
    (Counter, "marketcast_auth_failures_total", "Requests, upgrades and ops refused by a token check, by reason: missing (a required token is absent), expired (outside nbf/exp with leeway), invalid (any other refusal of a presented token), forbidden (a valid token that does not grant the market)."),
];

#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}
use Kind::{Counter, Gauge, Histogram};

fn describe() {
    for &(kind, name, help) in METRICS {
        match kind {
            Counter => metrics::describe_counter!(name, help),
            Gauge => metrics::describe_gauge!(name, help),
            Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::METRICS;

    /// Names passed to `counter!`, `gauge!` or `histogram!` in `src/`.
    fn recorded() -> Vec<String> {
        let mut names = Vec::new();
        for path in crate::rust_files() {
            if path.ends_with("metrics.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in text.match_indices(macro_name) {
                    let rest = text[at + macro_name.len()..].trim_start();
                    if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
                        names.push(name.to_string());
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn every_recorded_metric_is_described_and_documented() {
        let names = recorded();
        assert!(names.len() >= 20, "the scan found {names:?}");
        let doc = include_str!("../docs/OPERATIONS.md");
        for name in &names {
            assert!(
                METRICS.iter().any(|(_, n, _)| n == name),
                "{name} is recorded but has no description in METRICS"
            );
        }
        for (_, name, _) in METRICS {
            assert!(
                names.iter().any(|n| n == name),
                "{name} is described but never recorded"
            );
            // OPERATIONS.md shortens families: `marketcast_ws_frames_sent_total`, `_bytes_sent_total`.
            let suffix = name.trim_start_matches("marketcast_");
            let short = suffix.split_once('_').map_or(suffix, |(_, s)| s);
            assert!(
                doc.contains(name) || doc.contains(&format!("`_{short}`")),
                "{name} is missing from docs/OPERATIONS.md"
            );
        }
    }
}
