//! Shared test plumbing: databases, servers, HTTP and WebSocket clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use marketcast::config::{BroadcasterConfig, DbConfig, WriterConfig};
use marketcast::pgdev::PgDev;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::OnceCell;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Every wait in a test is bounded by this.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must point at a PostgreSQL server; run the suite with `make test`")
}

/// `url` with its database name replaced.
pub fn with_db(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("DATABASE_URL is a URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

/// The login role every test's writer runs as: a member of
/// `marketcast_writer` and nothing else, with a password (bin/pg-dev trusts
/// only `postgres`; other roles authenticate with scram-sha-256). The test
/// database's owner (the superuser of DATABASE_URL) only migrates and seeds.
pub const WRITER_ROLE: &str = "marketcast_test_writer";
pub const WRITER_PASSWORD: &str = "writer-test-pw";
/// Likewise for every test's broadcaster: only `marketcast_broadcaster`.
pub const BROADCASTER_ROLE: &str = "marketcast_test_broadcaster";
pub const BROADCASTER_PASSWORD: &str = "broadcaster-test-pw";

/// `url` connecting as `user` with `password`.
pub fn as_role(url: &str, user: &str, password: &str) -> String {
    let mut u = url::Url::parse(url).expect("a database URL");
    u.set_username(user).expect("URL takes a user");
    u.set_password(Some(password))
        .expect("URL takes a password");
    u.to_string()
}

/// host:port of a URL: roles are per cluster.
fn cluster_of(url: &str) -> String {
    let u = url::Url::parse(url).expect("a database URL");
    format!(
        "{}:{}",
        u.host_str().unwrap_or(""),
        u.port().unwrap_or(5432)
    )
}

/// Whether the test login roles exist in the suite's cluster (roles are
/// cluster-wide). Other clusters (a test's `OwnCluster`) are not remembered:
/// one may be wiped and another started on the same port.
static ROLES_READY: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);

/// Create (or reset) the test login roles in the cluster of `admin_url`
/// (once per run for the suite's cluster). Idempotent and safe when several
/// test processes share a cluster: catalog races are retried.
pub async fn ensure_roles(admin_url: &str) {
    let main = cluster_of(admin_url) == cluster_of(&server_url());
    let mut ready = ROLES_READY.lock().await;
    if main && *ready {
        return;
    }
    let a = connect(admin_url).await;
    let mut sql = String::new();
    for group in ["marketcast_writer", "marketcast_broadcaster"] {
        // Normally made by migrate; made here too so the order does not matter.
        sql += &format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{group}') THEN CREATE ROLE {group} NOLOGIN; END IF;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;"
        );
    }
    for (role, pw, group) in [
        (WRITER_ROLE, WRITER_PASSWORD, "marketcast_writer"),
        (
            BROADCASTER_ROLE,
            BROADCASTER_PASSWORD,
            "marketcast_broadcaster",
        ),
    ] {
        sql += &format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {role} LOGIN; END IF;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
             ALTER ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE INHERIT PASSWORD '{pw}';
             GRANT {group} TO {role};"
        );
    }
    let mut tries = 0;
    loop {
        match a.batch_execute(&sql).await {
            Ok(()) => break,
            // "tuple concurrently updated" when another process does the same.
            Err(e) if tries < 20 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("creating the test login roles: {e:?}"),
        }
    }
    if main {
        *ready = true;
    }
}

/// The superuser URL of the cluster that `url` points at: DATABASE_URL for
/// the suite's cluster, else bin/pg-dev's trusted `postgres` (own clusters).
fn admin_url_for(url: &str) -> String {
    let server = server_url();
    if cluster_of(url) == cluster_of(&server) {
        return server;
    }
    let mut u = url::Url::parse(url).expect("a database URL");
    u.set_username("postgres").expect("URL takes a user");
    u.set_password(None).expect("URL takes a password");
    u.set_path("/postgres");
    u.to_string()
}

/// Before a server connects as a test login role, make sure the role exists
/// in its cluster (a test may have started a cluster of its own).
async fn ensure_roles_for(db_url: &str) {
    let Ok(u) = url::Url::parse(db_url) else {
        return;
    };
    if [WRITER_ROLE, BROADCASTER_ROLE].contains(&u.username()) {
        ensure_roles(&admin_url_for(db_url)).await;
    }
}

static TEMPLATE: OnceCell<String> = OnceCell::const_new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

async fn admin() -> tokio_postgres::Client {
    connect(&server_url()).await
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to test Postgres");
    tokio::spawn(async move {
        let _ = conn.await; // test connection; errors surface in queries
    });
    c
}

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A migrated database (16 shards), cloned from a template migrated once per run.
    pub async fn new() -> TestDb {
        let tpl = TEMPLATE
            .get_or_init(|| async {
                let name = format!("mc_tpl_{}", std::process::id());
                let a = admin().await;
                // CREATE DATABASE cannot share a (multi-statement) transaction.
                a.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
                    .await
                    .unwrap();
                a.batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
                marketcast::db::migrate(&with_db(&server_url(), &name), 16)
                    .await
                    .expect("migrate template");
                ensure_roles(&server_url()).await;
                name
            })
            .await;
        Self::create(Some(tpl)).await
    }

    /// An empty database (for migrate tests).
    pub async fn empty() -> TestDb {
        Self::create(None).await
    }

    async fn create(template: Option<&str>) -> TestDb {
        let name = format!(
            "mc_t_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let a = admin().await;
        let sql = match template {
            Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t}"),
            None => format!("CREATE DATABASE {name}"),
        };
        // Concurrent clones of one template can collide briefly; retry.
        let mut tries = 0;
        loop {
            match a.batch_execute(&sql).await {
                Ok(()) => break,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("create database: {e:?}"),
            }
        }
        TestDb {
            url: with_db(&server_url(), &name),
            name,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// The owner's (superuser's) database config: for migrating and seeding,
    /// never for the writer or broadcaster under test (see [`writer_config`]).
    pub fn db_config(&self) -> DbConfig {
        DbConfig::new(self.url.clone())
    }

    /// This database as [`WRITER_ROLE`].
    pub fn writer_url(&self) -> String {
        as_role(&self.url, WRITER_ROLE, WRITER_PASSWORD)
    }

    /// This database as [`BROADCASTER_ROLE`].
    pub fn broadcaster_url(&self) -> String {
        as_role(&self.url, BROADCASTER_ROLE, BROADCASTER_PASSWORD)
    }

    pub async fn market(&self, id: &str) {
        self.client()
            .await
            .execute("INSERT INTO markets (id, title) VALUES ($1, $1)", &[&id])
            .await
            .unwrap();
    }

    /// Insert `n` trades into `market` through plain SQL, one transaction.
    pub async fn trades(&self, market: &str, n: i64) {
        self.client()
            .await
            .execute(
                "INSERT INTO trades (market_id, side, price, qty) SELECT $1, 'yes', 0.5, g FROM generate_series(1, $2::int8) g",
                &[&market, &n],
            )
            .await
            .unwrap();
    }
}

/// A market's seqs as the log holds them.
pub async fn seqs(c: &tokio_postgres::Client, market: &str) -> Vec<i64> {
    c.query(
        "SELECT seq FROM trades WHERE market_id = $1 ORDER BY seq",
        &[&market],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A server running in this process on 127.0.0.1:0.
pub struct Server {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn ws(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
    /// Cancel and wait for a clean exit.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server stops in time")
            .unwrap()
            .unwrap();
    }
}

pub async fn writer(cfg: WriterConfig) -> Server {
    ensure_roles_for(&cfg.db.url).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(marketcast::writer::run(l, cfg, shutdown.clone()));
    Server {
        addr,
        shutdown,
        task,
    }
}

pub async fn broadcaster(cfg: BroadcasterConfig) -> Server {
    ensure_roles_for(&cfg.db.url).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(marketcast::broadcaster::run(l, cfg, shutdown.clone()));
    let s = Server {
        addr,
        shutdown,
        task,
    };
    // Ready once LISTEN is up (healthz 200).
    assert!(
        healthy_within(&s, WAIT).await,
        "broadcaster never became healthy"
    );
    s
}

/// Whether `/healthz` of `s` answers 200 (a new connection each try) within `limit`.
pub async fn healthy_within(s: &Server, limit: Duration) -> bool {
    let url = format!("{}/healthz", s.http());
    tokio::time::timeout(limit, async {
        while !matches!(try_http("GET", &url, &[], None).await, Ok((200, _))) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok()
}

/// Minimal HTTP/1.1 client on hyper: (status, JSON body or Null).
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Value) {
    try_http(method, url, headers, body)
        .await
        .expect("http request")
}

pub async fn try_http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let (status, bytes) = http_raw(
        method,
        url,
        headers,
        body.map(|b| Bytes::from(b.to_string())),
    )
    .await?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

pub async fn http_raw(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Bytes>,
) -> anyhow::Result<(u16, Bytes)> {
    let (status, _, bytes) = http_response(method, url, headers, body).await?;
    Ok((status, bytes))
}

/// As [`http_raw`], with the response's headers.
pub async fn http_response(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Bytes>,
) -> anyhow::Result<(u16, hyper::HeaderMap, Bytes)> {
    let has_ct = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    let mut all = headers.to_vec();
    if body.is_some() && !has_ct {
        all.push(("content-type", "application/json"));
    }
    http_full(method, url, &all, body).await
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn connect_ws(url: &str) -> Ws {
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("ws connect in time")
        .expect("ws connect")
        .0
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next text message as JSON (pings and pongs skipped). Panics on close.
pub async fn recv(ws: &mut Ws) -> Value {
    match next_event(ws).await {
        Event::Json(v) => v,
        Event::Closed(c) => panic!("connection closed: {c:?}"),
    }
}

#[derive(Debug)]
pub enum Event {
    Json(Value),
    Closed(Option<u16>),
}

pub async fn next_event(ws: &mut Ws) -> Event {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time");
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("server sends JSON");
                // Every server message must be one docs/asyncapi.yaml allows.
                crate::contract::check_ws(&v);
                return Event::Json(v);
            }
            Some(Ok(Message::Close(c))) => {
                return Event::Closed(c.map(|c: CloseFrame| u16::from(c.code)))
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Event::Closed(None),
        }
    }
}

/// Wait for the close code (skipping any other messages).
pub async fn expect_close(ws: &mut Ws) -> Option<u16> {
    loop {
        if let Event::Closed(c) = next_event(ws).await {
            return c;
        }
    }
}

/// Receive trades until `to`, asserting they are exactly `from..=to` of
/// `market`, in order, each once. Other message types are not allowed in between.
pub async fn expect_trades(ws: &mut Ws, market: &str, from: i64, to: i64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut want = from;
    while want <= to {
        let v = recv(ws).await;
        assert_eq!(v["type"], "trade", "expected trade {want}, got {v}");
        assert_eq!(v["market"], market, "{v}");
        assert_eq!(
            v["seq"].as_i64(),
            Some(want),
            "gapless, in order: expected seq {want}, got {v}"
        );
        out.push(v);
        want += 1;
    }
    out
}

/// Assert nothing arrives for `d` (used after the exact expected sequence).
/// Keeps reading (so pings get their pongs) until `d` has passed.
pub async fn expect_silence(ws: &mut Ws, d: Duration) {
    let until = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Text(t)))) => panic!("unexpected message: {t}"),
            Ok(Some(Ok(Message::Close(c)))) => panic!("unexpected close: {c:?}"),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => panic!("connection failed: {e}"),
            Ok(None) => panic!("connection ended"),
        }
    }
}

/// Subscribe and return the `subscribed` reply.
pub async fn subscribe(ws: &mut Ws, market: &str, from_seq: Option<i64>) -> Value {
    let mut op = serde_json::json!({"op": "subscribe", "market": market, "id": 1});
    if let Some(f) = from_seq {
        op["from_seq"] = f.into();
    }
    send(ws, op).await;
    let v = recv(ws).await;
    assert_eq!(v["type"], "subscribed", "{v}");
    v
}

/// The writer every test runs by default: connected as [`WRITER_ROLE`].
pub fn writer_config(db: &TestDb) -> WriterConfig {
    WriterConfig::new(DbConfig::new(db.writer_url()))
}

/// The broadcaster every test runs by default: connected as [`BROADCASTER_ROLE`].
pub fn broadcaster_config(db: &TestDb) -> BroadcasterConfig {
    let mut c = BroadcasterConfig::new(DbConfig::new(db.broadcaster_url()));
    c.listener.heartbeat = Duration::from_millis(500);
    c.hub.reconcile_interval = Duration::from_millis(500);
    c.listener.reconnect_max = Duration::from_millis(500);
    c
}

/// A PostgreSQL cluster of its own, for tests that stop or restart Postgres
/// (that must not disturb the tests sharing DATABASE_URL's cluster), through
/// the crate's one `bin/pg-dev` wrapper. Stopped and wiped on drop, also when
/// the test panics.
pub struct OwnCluster {
    pg: PgDev,
    pub url: String,
}

impl OwnCluster {
    /// `name` keeps the state directories of concurrent tests apart.
    pub async fn start(name: &str) -> OwnCluster {
        let dir = format!("/tmp/mc-{name}-{}", std::process::id());
        let pg = PgDev::start(std::path::Path::new(&dir))
            .await
            .unwrap_or_else(|e| panic!("pg-dev start: {e:#}"));
        OwnCluster {
            url: pg.url.clone(),
            pg,
        }
    }

    /// `bin/pg-dev <cmd>` on this cluster (`restart`, `stop`, `start`).
    pub async fn run(&self, cmd: &str) {
        let args: Vec<&str> = cmd.split(' ').collect();
        let url = self
            .pg
            .run(&args)
            .await
            .unwrap_or_else(|e| panic!("pg-dev {cmd}: {e:#}"));
        if cmd == "start" || cmd == "restart" {
            assert_eq!(
                url.as_deref(),
                Some(self.url.as_str()),
                "the cluster came back on its old port"
            );
        }
    }

    /// A database in this cluster, migrated with 16 shards.
    pub async fn test_db(&self) -> TestDb {
        let name = "marketcast".to_string();
        connect(&self.url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = with_db(&self.url, &name);
        marketcast::db::migrate(&url, 16).await.expect("migrate");
        ensure_roles(&self.url).await;
        TestDb { name, url }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        // Blocking, but only for the pg_ctl stop of a test that is ending anyway.
        let _ = self.pg.run_blocking(&["stop", "--wipe"]);
    }
}

/// One HTTP/1.1 request on a new connection: the status, the response's
/// headers and its body (empty for a 101, whose connection is dropped).
pub async fn http_full(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Bytes>,
) -> anyhow::Result<(u16, hyper::HeaderMap, Bytes)> {
    let (status, response_headers, bytes) = http_unchecked(method, url, headers, body).await?;
    // Every answer of our servers must be one docs/openapi.yaml allows.
    crate::contract::check_http(method, url, status, &response_headers, &bytes);
    Ok((status, response_headers, bytes))
}

/// One request and its whole answer, not checked against the contract: for
/// what stands between a client and the servers (a load balancer answers
/// its own 503 while no broadcaster is up).
pub async fn http_unchecked(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Bytes>,
) -> anyhow::Result<(u16, hyper::HeaderMap, Bytes)> {
    let u = url::Url::parse(url)?;
    let addr = format!("{}:{}", u.host_str().unwrap(), u.port().unwrap());
    let tcp = TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await; // one request per connection
    });
    let path = match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    };
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", u.host_str().unwrap());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.unwrap_or_default()))?;
    let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await??;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    if status == 101 {
        return Ok((status, headers, Bytes::new()));
    }
    let bytes = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await??
        .to_bytes();
    Ok((status, headers, bytes))
}

/// A WebSocket upgrade request to `url` with `headers` added: the status,
/// the response's headers and its body as JSON (Null when not JSON).
pub async fn ws_upgrade(url: &str, headers: &[(&str, &str)]) -> (u16, hyper::HeaderMap, Value) {
    let http_url = url.replacen("ws://", "http://", 1);
    let mut all = vec![
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    all.extend_from_slice(headers);
    let (status, h, body) = http_full("GET", &http_url, &all, None)
        .await
        .expect("upgrade request");
    (
        status,
        h,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// [`connect_ws`] with `headers` on the upgrade request.
pub async fn connect_ws_with(url: &str, headers: &[(&str, &str)]) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().expect("a ws URL");
    for (k, v) in headers {
        req.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("a header name"),
            v.parse().expect("a header value"),
        );
    }
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("ws connect in time")
        .expect("ws connect")
        .0
}
