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

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "marketcast_writer_requests_total",
        "Writer HTTP requests by route and status."
    );
    describe_histogram!(
        "marketcast_writer_request_seconds",
        "Writer HTTP request latency."
    );
    describe_histogram!(
        "marketcast_writer_batch_size",
        "Trades per writer transaction."
    );
    describe_gauge!("marketcast_ws_connections", "Open WebSocket connections.");
    describe_gauge!(
        "marketcast_subscriptions",
        "Active market subscriptions over all connections."
    );
    describe_gauge!(
        "marketcast_hub_markets",
        "Markets with at least one subscriber in this broadcaster."
    );
    describe_counter!(
        "marketcast_ws_frames_sent_total",
        "WebSocket frames written to clients."
    );
    describe_counter!(
        "marketcast_ws_bytes_sent_total",
        "Bytes written to WebSocket clients."
    );
    describe_counter!(
        "marketcast_ws_writes_total",
        "Socket writes (each coalesces one or more frames)."
    );
    describe_counter!(
        "marketcast_notifications_total",
        "Notifications received on the LISTEN connection."
    );
    describe_counter!(
        "marketcast_notifications_rejected_total",
        "Notifications whose payload was not a valid doorbell (logged, never delivered)."
    );
    describe_counter!(
        "marketcast_log_reads_total",
        "Reads of new trades from the log triggered by doorbells or reconciles."
    );
    describe_counter!(
        "marketcast_trades_published_total",
        "Trades published by the hub to live subscribers."
    );
    describe_counter!(
        "marketcast_replayed_trades_total",
        "Trades sent to catch a subscriber up, by source (memory or postgres)."
    );
    describe_counter!("marketcast_gaps_repaired_total", "Times the hub found trades in the log that no notification announced (lost notifications).");
    describe_counter!(
        "marketcast_slow_consumer_closes_total",
        "Connections closed with 4000 because they could not keep up."
    );
    describe_counter!(
        "marketcast_listen_reconnects_total",
        "Times the LISTEN connection was re-established."
    );
    describe_gauge!(
        "marketcast_listen_up",
        "1 while the LISTEN connection is established, else 0."
    );
    describe_gauge!(
        "marketcast_notify_queue_usage",
        "pg_notification_queue_usage(): fraction of the cluster's NOTIFY queue in use."
    );
    describe_histogram!(
        "marketcast_commit_to_send_seconds",
        "Time from a trade's commit timestamp to its first write to a live subscriber."
    );
    describe_counter!(
        "marketcast_client_errors_total",
        "Error replies sent to WebSocket clients, by code."
    );
}
