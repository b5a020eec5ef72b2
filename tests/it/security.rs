//! Security properties (docs/SECURITY.md): secrets never reach any output,
//! each role's database login can do its job and nothing more, the `Origin`
//! allowlist, the writer's request limits, and client input that once could
//! panic a session.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

// ---------------------------------------------------------------- secrets

/// The real binary, run with RUST_LOG=trace and nothing from our environment
/// but what is given; stderr goes to a file (trace output is large and must
/// never block the process), stdout is collected as it comes.
struct Bin {
    child: tokio::process::Child,
    stdout: Arc<Mutex<String>>,
    stderr: PathBuf,
    /// The `listening on` address, when the command is a server.
    addr: Option<String>,
}

static NEXT_BIN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Bin {
    async fn start(args: &[&str], env: &[(&str, &str)], server: bool) -> Bin {
        let n = NEXT_BIN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr = std::env::temp_dir().join(format!(
            "marketcast-security-{}-{n}.log",
            std::process::id()
        ));
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_marketcast"));
        cmd.args(args)
            .env_clear()
            .env("RUST_LOG", "trace")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("run the marketcast binary");
        let out = Arc::new(Mutex::new(String::new()));
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let sink = out.clone();
        tokio::spawn(async move {
            let mut first = Some(first_tx);
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(tx) = first.take() {
                    let _ = tx.send(l.clone()); // the test may have stopped waiting
                }
                let mut o = sink.lock().unwrap();
                o.push_str(&l);
                o.push('\n');
            }
        });
        let addr = if server {
            let line = tokio::time::timeout(WAIT, first_rx)
                .await
                .expect("the server printed its address in time")
                .expect("the server printed a line");
            Some(
                line.strip_prefix("listening on ")
                    .unwrap_or_else(|| panic!("first stdout line: {line}"))
                    .to_string(),
            )
        } else {
            None
        };
        Bin {
            child,
            stdout: out,
            stderr,
            addr,
        }
    }

    fn http(&self) -> String {
        format!("http://{}", self.addr.as_deref().unwrap())
    }

    /// SIGTERM (servers), wait for the exit; returns (success, everything printed).
    async fn finish(mut self) -> (bool, String) {
        if self.addr.is_some() {
            let pid = self.child.id().unwrap().to_string();
            let st = tokio::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .await
                .unwrap();
            assert!(st.success());
        }
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the process exits in time")
            .unwrap();
        // The stdout reader ends at EOF, right after the exit.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut all = self.stdout.lock().unwrap().clone();
        all.push_str(&std::fs::read_to_string(&self.stderr).unwrap());
        let _ = std::fs::remove_file(&self.stderr); // best effort
        (status.success(), all)
    }
}

fn assert_no_secret(what: &str, output: &str, secrets: &[&str]) {
    for s in secrets {
        if let Some(i) = output.find(s) {
            let from = output[..i].rfind('\n').map_or(0, |j| j + 1);
            let to = output[i..].find('\n').map_or(output.len(), |j| i + j);
            panic!(
                "{what}: a secret appears in the output: {}",
                &output[from..to]
            );
        }
    }
}

/// Whether the cluster asks non-superusers for passwords (bin/pg-dev's own
/// clusters do; one started before that may still trust everyone).
async fn passwords_enforced(admin: &tokio_postgres::Client) -> bool {
    admin
        .query_one(
            "SELECT count(*) FROM pg_hba_file_rules WHERE auth_method IN ('scram-sha-256', 'md5', 'password')",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
}

/// The write token, the JWT secret, presented JWTs and the database
/// password never appear on stdout or stderr at RUST_LOG=trace (text and
/// JSON), in HTTP answers or in /metrics: not on wrong-token requests, not
/// on successful writes, not when the database refuses the password or
/// cannot be reached, not in `--help`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_answers_or_metrics() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let tag = format!("{:016x}", fastrand::u64(..));
    let password = format!("PwSecret{tag}");
    let wrong_password = format!("PwWrong{tag}");
    let token = format!("TokSecret{tag}");
    let jwt_secret = format!("JwtSecret{tag}-at-least-32-bytes-long");
    let sign = |secret: &str, claims: Value| {
        let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let jwt = sign(
        &jwt_secret,
        json!({"exp": exp, "sub": tag, "markets": ["SEC*"], "write": ["SEC-JWT"]}),
    );
    let forged_jwt = sign(
        &format!("Forged{tag}-at-least-32-bytes-long"),
        json!({"exp": exp, "write": ["*"]}),
    );
    let secrets = [
        password.as_str(),
        wrong_password.as_str(),
        token.as_str(),
        jwt_secret.as_str(),
        jwt.as_str(),
        forged_jwt.as_str(),
    ];
    let (w_role, b_role) = (format!("sec_w_{}", db.name), format!("sec_b_{}", db.name));
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {w_role}; DROP ROLE IF EXISTS {b_role};
             CREATE ROLE {w_role} LOGIN PASSWORD '{password}' IN ROLE marketcast_writer;
             CREATE ROLE {b_role} LOGIN PASSWORD '{password}' IN ROLE marketcast_broadcaster;"
        ))
        .await
        .unwrap();
    let w_url = as_role(&db.url, &w_role, &password);
    let b_url = as_role(&db.url, &b_role, &password);
    let enforced = passwords_enforced(&admin).await;
    let mut outputs: Vec<(String, String)> = Vec::new();
    let auth = format!("Bearer {token}");

    // --- the writer: wrong tokens, then the right one, then JWTs.
    let w = Bin::start(
        &["writer", "--listen", "127.0.0.1:0"],
        &[
            ("DATABASE_URL", &w_url),
            ("MARKETCAST_WRITE_TOKEN", &token),
            ("MARKETCAST_JWT_HS256_SECRET", &jwt_secret),
        ],
        true,
    )
    .await;
    let markets = format!("{}/v1/markets", w.http());
    let near_misses = [
        format!("Bearer {}", &token[..token.len() - 1]),
        format!("Bearer {token}x"),
        format!("Bearer {}", token.to_lowercase()),
        format!("Basic {token}"),
        token.clone(),
    ];
    for bad in &near_misses {
        let (st, body) = http_raw(
            "POST",
            &markets,
            &[("authorization", bad.as_str())],
            Some(r#"{"id":"SEC"}"#.into()),
        )
        .await
        .unwrap();
        assert_eq!(st, 401);
        assert_no_secret("401 answer", &String::from_utf8_lossy(&body), &secrets);
    }
    let (st, body) = http(
        "POST",
        &markets,
        &[("authorization", &auth)],
        Some(r#"{"id":"SEC"}"#),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = http(
        "POST",
        &format!("{markets}/SEC/trades"),
        &[("authorization", &auth)],
        Some(r#"{"side":"yes","price":"0.42","qty":7,"client_order_id":"sec-1"}"#),
    )
    .await;
    assert_eq!((st, &body["seq"]), (201, &json!(1)), "{body}");
    let bearer_jwt = format!("Bearer {jwt}");
    let (st, body) = http(
        "POST",
        &markets,
        &[("authorization", &bearer_jwt)],
        Some(r#"{"id":"SEC-JWT"}"#),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    for (method, path, body, granted) in [
        ("GET", "/v1/markets", None, 200),
        ("GET", "/v1/markets/SEC/trades", None, 200),
        ("POST", "/v1/markets", Some(r#"{"id":"SEC-NO"}"#), 403),
    ] {
        for (auth, expected) in [
            (bearer_jwt.clone(), granted),
            (format!("Bearer {forged_jwt}"), 401),
        ] {
            let (st, answer) = http_raw(
                method,
                &format!("{}{path}", w.http()),
                &[("authorization", auth.as_str())],
                body.map(Into::into),
            )
            .await
            .unwrap();
            assert_eq!(st, expected, "{method} {path}");
            assert_no_secret(path, &String::from_utf8_lossy(&answer), &secrets);
        }
    }
    for path in [
        "/metrics",
        "/healthz",
        "/v1/markets",
        "/v1/markets/SEC/trades",
    ] {
        let (st, body) = http_raw("GET", &format!("{}{path}", w.http()), &[], None)
            .await
            .unwrap();
        assert_eq!(st, 200, "{path}");
        assert_no_secret(path, &String::from_utf8_lossy(&body), &secrets);
    }
    let (ok, out) = w.finish().await;
    assert!(ok, "the writer exits 0 on SIGTERM:\n{out}");
    assert!(
        out.contains("TRACE"),
        "RUST_LOG=trace took effect (else this test proves nothing)"
    );
    outputs.push(("writer".into(), out));

    // --- the broadcaster (JSON logs): a subscriber gets the trade.
    let b = Bin::start(
        &[
            "--log-format",
            "json",
            "broadcaster",
            "--listen",
            "127.0.0.1:0",
        ],
        &[("DATABASE_URL", &b_url)],
        true,
    )
    .await;
    let ws_url = format!("ws://{}/ws", b.addr.as_deref().unwrap());
    let mut ws = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok((ws, _)) = tokio_tungstenite::connect_async(&ws_url).await {
                return ws;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    subscribe(&mut ws, "SEC", Some(0)).await;
    let t = expect_trades(&mut ws, "SEC", 1, 1).await;
    assert_eq!(t[0]["qty"], 7);
    let (_, metrics) = http_raw("GET", &format!("{}/metrics", b.http()), &[], None)
        .await
        .unwrap();
    assert_no_secret(
        "broadcaster /metrics",
        &String::from_utf8_lossy(&metrics),
        &secrets,
    );
    let (ok, out) = b.finish().await;
    assert!(ok, "the broadcaster exits 0 on SIGTERM:\n{out}");
    assert_eq!(expect_close(&mut ws).await, Some(1001));
    outputs.push(("broadcaster".into(), out));

    // --- database connections that fail: a wrong password, a role that does
    // not exist (fails under any authentication), a port nobody listens on.
    let nobody = format!("nosuch_{}", db.name);
    let failing = [
        (
            "wrong password",
            as_role(&db.url, &w_role, &wrong_password),
            enforced,
        ),
        ("unknown role", as_role(&db.url, &nobody, &password), true),
        (
            "unreachable",
            format!("postgres://{w_role}:{password}@127.0.0.1:1/x"),
            true,
        ),
    ];
    for (what, url, fails) in &failing {
        let w = Bin::start(
            &["writer", "--listen", "127.0.0.1:0", "--db-timeout", "2s"],
            &[("DATABASE_URL", url), ("MARKETCAST_WRITE_TOKEN", &token)],
            true,
        )
        .await;
        let (st, body) = http_raw(
            "POST",
            &format!("{}/v1/markets/SEC/trades", w.http()),
            &[("authorization", &auth)],
            Some(r#"{"side":"no","price":"0.5","qty":1}"#.into()),
        )
        .await
        .unwrap();
        if *fails {
            assert_eq!(st, 503, "{what}: {}", String::from_utf8_lossy(&body));
        }
        assert_no_secret(what, &String::from_utf8_lossy(&body), &secrets);
        let (st, body) = http_raw("GET", &format!("{}/healthz", w.http()), &[], None)
            .await
            .unwrap();
        if *fails {
            assert_eq!(st, 503, "{what}");
        }
        assert_no_secret(what, &String::from_utf8_lossy(&body), &secrets);
        let (ok, out) = w.finish().await;
        assert!(ok, "{what}: writer exit:\n{out}");
        outputs.push((format!("writer, {what}"), out));

        // A broadcaster that must read the shard count retries it, logging
        // each failure; one given its shards serves at once and its LISTEN
        // connection retries instead.
        for shards in [None, Some("0-3")] {
            let mut args = vec![
                "broadcaster",
                "--listen",
                "127.0.0.1:0",
                "--db-timeout",
                "1s",
            ];
            args.extend(shards.iter().flat_map(|s| ["--shards", s]));
            let b = Bin::start(&args, &[("DATABASE_URL", url)], true).await;
            if shards.is_some() {
                let (st, body) = http_raw("GET", &format!("{}/healthz", b.http()), &[], None)
                    .await
                    .unwrap();
                if *fails {
                    assert_eq!(st, 503, "{what}");
                }
                assert_no_secret(what, &String::from_utf8_lossy(&body), &secrets);
            }
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let (ok, out) = b.finish().await;
            assert!(ok, "{what}: broadcaster exit:\n{out}");
            outputs.push((format!("broadcaster {shards:?}, {what}"), out));
        }

        // One-shot commands exit non-zero with the reason, never the password.
        for args in [vec!["migrate"], vec!["prune", "--older-than", "30d"]] {
            let m = Bin::start(&args, &[("DATABASE_URL", url)], false).await;
            let (ok, out) = m.finish().await;
            if *fails {
                assert!(!ok, "{what}: {args:?} fails:\n{out}");
            }
            outputs.push((format!("{args:?}, {what}"), out));
        }
    }
    // A URL that does not even parse is refused without being echoed.
    let bad = format!("postgres://{w_role}:{password}@127.0.0.1:notaport/x");
    for args in [
        vec!["writer", "--listen", "127.0.0.1:0"],
        vec!["broadcaster", "--listen", "127.0.0.1:0"],
        vec!["migrate"],
    ] {
        let m = Bin::start(&args, &[("DATABASE_URL", &bad)], false).await;
        let (ok, out) = m.finish().await;
        assert!(!ok, "{args:?} refuses a bad URL:\n{out}");
        assert!(out.contains("not a valid PostgreSQL URL"), "{out}");
        outputs.push((format!("{args:?}, bad URL"), out));
    }
    // --help shows which variables are read, never their values.
    for sub in ["writer", "broadcaster", "migrate", "prune", "demo"] {
        let h = Bin::start(
            &[sub, "--help"],
            &[
                ("DATABASE_URL", &w_url),
                ("MARKETCAST_WRITE_TOKEN", &token),
                ("MARKETCAST_JWT_HS256_SECRET", &jwt_secret),
            ],
            false,
        )
        .await;
        let (ok, out) = h.finish().await;
        assert!(ok && out.contains("DATABASE_URL"), "{sub} --help:\n{out}");
        outputs.push((format!("{sub} --help"), out));
    }

    for (what, out) in &outputs {
        assert_no_secret(what, out, &secrets);
    }
    drop(admin);
    let _ = db
        .client()
        .await
        .batch_execute(&format!(
            "DROP OWNED BY {w_role}, {b_role}; DROP ROLE {w_role}; DROP ROLE {b_role};"
        ))
        .await; // best effort: roles are cluster-wide, the cluster is thrown away
}

// ---------------------------------------------------------------- roles

/// The broadcaster's login can read and LISTEN, and change nothing.
#[tokio::test]
async fn broadcaster_role_cannot_write_anything() {
    let db = TestDb::new().await;
    db.market("RB").await;
    db.trades("RB", 2).await;
    let b = connect(&db.broadcaster_url()).await;
    assert_eq!(seqs(&b, "RB").await, vec![1, 2]);
    b.batch_execute("LISTEN marketcast_shard_0").await.unwrap();
    for sql in [
        "INSERT INTO markets (id) VALUES ('RB2')",
        "INSERT INTO trades (market_id, side, price, qty) VALUES ('RB', 'yes', 0.5, 1)",
        "UPDATE trades SET qty = 9",
        "DELETE FROM trades",
        "TRUNCATE trades",
        "UPDATE markets SET last_seq = 0",
        "DELETE FROM markets",
        "TRUNCATE markets",
        "UPDATE marketcast_config SET shard_count = 1",
        "DELETE FROM marketcast_migrations",
        "SELECT * FROM marketcast_lock_markets(ARRAY['RB'])",
        "SELECT marketcast_prune(now())",
        "CREATE TABLE public.x (a int)",
        "ALTER TABLE trades DISABLE TRIGGER trades_append_only",
    ] {
        let e = b.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "broadcaster: {sql}: {e}");
    }
    assert_eq!(seqs(&db.client().await, "RB").await, vec![1, 2]);
}

/// The writer's login can insert markets and trades (and lock markets for
/// its batches), and cannot change or remove history, not even through the
/// prune flag, its own temporary tables or a chosen trade_id.
#[tokio::test]
async fn writer_role_cannot_rewrite_history() {
    let db = TestDb::new().await;
    let w = connect(&db.writer_url()).await;
    let owner = db.client().await;

    // Its job.
    w.batch_execute("INSERT INTO markets (id, title) VALUES ('RW', 't')")
        .await
        .unwrap();
    let seq: i64 = w
        .query_one(
            "INSERT INTO trades (market_id, seq, side, price, qty, trader, client_order_id) \
             VALUES ('RW', 77, 'yes', 0.5, 1, 'me', 'c1') RETURNING seq",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seq, 1, "a supplied seq is ignored, not refused");
    let locked = w
        .query("SELECT id FROM marketcast_lock_markets(ARRAY['RW'])", &[])
        .await
        .unwrap();
    assert_eq!(locked.len(), 1);

    // Not its job.
    for sql in [
        "UPDATE trades SET qty = 2",
        "DELETE FROM trades",
        "TRUNCATE trades",
        "UPDATE markets SET last_seq = 5",
        "DELETE FROM markets",
        "TRUNCATE markets",
        "UPDATE marketcast_config SET shard_count = 1",
        "SELECT marketcast_prune(now())",
        "ALTER TABLE trades DISABLE TRIGGER trades_append_only",
        "DROP TRIGGER trades_append_only ON trades",
        "CREATE TABLE public.x (a int)",
        "INSERT INTO trades (trade_id, market_id, side, price, qty) OVERRIDING SYSTEM VALUE \
         VALUES (1, 'RW', 'yes', 0.5, 1)",
    ] {
        let e = w.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "writer: {sql}: {e}");
    }
    // The prune flag is only honoured for a role that may DELETE at all.
    for sql in [
        "SET marketcast.pruning = 'on'; DELETE FROM trades",
        "BEGIN; SELECT set_config('marketcast.pruning', 'on', true); DELETE FROM trades",
    ] {
        let e = w.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "writer: {sql}: {e}");
        let _ = w.batch_execute("ROLLBACK").await; // the second one left a transaction open
    }

    // Temporary tables named like ours do not fool the triggers (migration
    // 0003): before it, this made seq jump from 1 to 1001.
    w.batch_execute(
        "CREATE TEMP TABLE markets (id text, status text, shard int, epoch text, \
                                    last_seq bigint, last_price numeric, volume bigint);
         INSERT INTO markets VALUES ('RW', 'open', 3, 'e', 1000, NULL, 0);
         CREATE TEMP TABLE trades (market_id text, seq bigint, client_order_id text, \
                                   qty bigint, side text, price numeric);
         INSERT INTO trades VALUES ('RW', 5000, 'c2', 1, 'yes', 0.5);
         CREATE TEMP TABLE marketcast_config (shard_count int);
         INSERT INTO marketcast_config VALUES (1000000);",
    )
    .await
    .unwrap();
    let seq: i64 = w
        .query_one(
            "INSERT INTO public.trades (market_id, side, price, qty, client_order_id) \
             VALUES ('RW', 'no', 0.25, 3, 'c2') RETURNING seq",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seq, 2, "seq comes from public.trades and public.markets");
    w.batch_execute("INSERT INTO public.markets (id) VALUES ('RW-new')")
        .await
        .unwrap();
    let locked = w
        .query("SELECT id FROM marketcast_lock_markets(ARRAY['RW'])", &[])
        .await
        .unwrap();
    assert_eq!(locked.len(), 1, "locks public.markets");
    drop(w);

    assert_eq!(seqs(&owner, "RW").await, vec![1, 2]);
    let r = owner
        .query_one(
            "SELECT last_seq, volume, last_price::text, \
                    (SELECT shard FROM markets WHERE id = 'RW-new') \
               FROM markets WHERE id = 'RW'",
            &[],
        )
        .await
        .unwrap();
    let (last, vol, price, shard): (i64, i64, String, i32) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    assert_eq!((last, vol, price.as_str()), (2, 4, "0.7500"));
    assert!(
        (0..16).contains(&shard),
        "shard from the real config: {shard}"
    );
    let ids: i64 = owner
        .query_one("SELECT count(DISTINCT trade_id) FROM trades", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ids, 2);
}

/// The suite's default servers really run as the least-privileged logins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_test_servers_connect_as_the_group_roles() {
    let db = TestDb::new().await;
    let owner = db.client().await;
    let w = writer(writer_config(&db)).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let (st, _) = http(
        "POST",
        &format!("{}/v1/markets", w.http()),
        &[],
        Some(r#"{"id":"LP"}"#),
    )
    .await;
    assert_eq!(st, 201);
    let users: Vec<(String, String)> = owner
        .query(
            "SELECT DISTINCT usename::text, application_name FROM pg_stat_activity \
              WHERE datname = current_database() AND application_name LIKE 'marketcast-%' ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Every connection of the servers under test, by application: the
    // writer's pool as the writer login, everything of the broadcaster (its
    // pool, the hub's pool, the LISTEN connection) as the broadcaster login.
    for (user, app) in &users {
        let want = if app == "marketcast-writer" {
            WRITER_ROLE
        } else {
            BROADCASTER_ROLE
        };
        assert_eq!(user, want, "{app}: {users:?}");
    }
    for app in [
        "marketcast-writer",
        "marketcast-broadcaster",
        "marketcast-listener",
    ] {
        assert!(
            users.iter().any(|(_, a)| a == app),
            "{app} connected: {users:?}"
        );
    }
    for role in [WRITER_ROLE, BROADCASTER_ROLE] {
        let r = owner
            .query_one(
                "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, \
                        (SELECT array_agg(g.rolname::text ORDER BY g.rolname) FROM pg_auth_members m \
                           JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid) \
                   FROM pg_roles r WHERE rolname = $1",
                &[&role],
            )
            .await
            .unwrap();
        let flags: (bool, bool, bool, bool) = (r.get(0), r.get(1), r.get(2), r.get(3));
        assert_eq!(flags, (false, false, false, false), "{role}");
        let groups: Vec<String> = r.get(4);
        let want = if role == WRITER_ROLE {
            "marketcast_writer"
        } else {
            "marketcast_broadcaster"
        };
        assert_eq!(groups, vec![want.to_string()], "{role}");
    }
    w.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------- Origin

/// Open a WebSocket with the given Origin; Ok(()) on 101, Err((status, body)).
async fn ws_with_origin(url: &str, origin: Option<&str>) -> Result<(), (u16, Value)> {
    let mut req = url.into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake in time")
    {
        Ok((mut ws, _)) => {
            send(&mut ws, json!({"op": "ping", "id": 1})).await;
            assert_eq!(recv(&mut ws).await, json!({"type": "pong", "id": 1}));
            Ok(())
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((resp.status().as_u16(), body))
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_allowlist_refuses_other_sites_before_the_upgrade() {
    let db = TestDb::new().await;
    let mut cfg = broadcaster_config(&db);
    cfg.allowed_origins = Some(
        marketcast::config::parse_origins("https://app.example,http://localhost:8080").unwrap(),
    );
    let b = broadcaster(cfg.clone()).await;
    let url = b.ws();
    for ok in [
        Some("https://app.example"),
        Some("HTTPS://APP.example:443"),
        Some("http://localhost:8080"),
        None, // a non-browser client
    ] {
        assert_eq!(ws_with_origin(&url, ok).await, Ok(()), "{ok:?}");
    }
    for bad in [
        "https://evil.example",
        "http://app.example",
        "https://app.example:8443",
        "https://app.example.evil.example",
        "null",
        "not an origin",
    ] {
        let (st, body) = ws_with_origin(&url, Some(bad)).await.unwrap_err();
        assert_eq!(st, 403, "{bad}");
        assert_eq!(body["error"]["code"], "origin_not_allowed", "{bad}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(bad),
            "{body}"
        );
    }
    b.stop().await;

    // --require-origin: clients without one are refused too.
    cfg.require_origin = true;
    let b = broadcaster(cfg).await;
    let (st, body) = ws_with_origin(&b.ws(), None).await.unwrap_err();
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (403, Some("origin_not_allowed"))
    );
    assert_eq!(
        ws_with_origin(&b.ws(), Some("https://app.example")).await,
        Ok(())
    );
    b.stop().await;

    // Without an allowlist any origin is welcome (the default).
    let b = broadcaster(broadcaster_config(&db)).await;
    assert_eq!(
        ws_with_origin(&b.ws(), Some("https://evil.example")).await,
        Ok(())
    );
    b.stop().await;
}

// ---------------------------------------------------------------- client input

/// from_seq = i64::MAX made `from_seq + 1` overflow (a panic in debug builds,
/// a wrapped seq in release): now a `bad_request`, and the connection lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_seq_at_the_top_of_the_range_is_a_bad_request() {
    let db = TestDb::new().await;
    db.market("TOP").await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws(&b.ws()).await;
    send(
        &mut ws,
        json!({"op": "subscribe", "market": "TOP", "from_seq": i64::MAX, "id": 1}),
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!(
        (v["code"].as_str(), v["id"].as_i64()),
        (Some("bad_request"), Some(1)),
        "{v}"
    );
    subscribe(&mut ws, "TOP", Some(i64::MAX - 1)).await;
    send(&mut ws, json!({"op": "ping", "id": 2})).await;
    assert_eq!(recv(&mut ws).await, json!({"type": "pong", "id": 2}));

    let mut q = connect_ws(&format!("{}?market=TOP&from_seq={}", b.ws(), i64::MAX)).await;
    let v = recv(&mut q).await;
    assert_eq!(v["code"], "bad_request", "{v}");
    send(&mut q, json!({"op": "ping", "id": 3})).await;
    assert_eq!(recv(&mut q).await, json!({"type": "pong", "id": 3}));
    b.stop().await;
}

// ---------------------------------------------------------------- writer limits

/// Send a request's head and part of its body, and keep the socket open.
async fn partial_post(addr: &str, path: &str, declared: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n{{"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

async fn read_status(s: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_bounds_body_size_body_time_and_concurrent_requests() {
    let db = TestDb::new().await;
    db.market("LIM").await;
    let mut cfg = writer_config(&db);
    cfg.max_body_bytes = 2048;
    cfg.max_concurrent_requests = 2;
    cfg.body_timeout = Duration::from_millis(1500);
    let s = writer(cfg).await;
    let addr = s.addr.to_string();
    let trades = format!("{}/v1/markets/LIM/trades", s.http());
    let padded = |n: usize| {
        let t = r#"{"side":"yes","price":"0.5","qty":1}"#;
        format!("{t}{}", " ".repeat(n - t.len()))
    };

    // Body size: the configured bound, announced or not.
    let (st, body) = http("POST", &trades, &[], Some(&padded(2048))).await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = http("POST", &trades, &[], Some(&padded(2049))).await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (413, Some("too_large")),
        "{body}"
    );
    assert!(body["error"]["message"].as_str().unwrap().contains("2048"));

    // Two clients trickling their bodies hold both request slots...
    let mut slow1 = partial_post(&addr, "/v1/markets/LIM/trades", 100).await;
    let mut slow2 = partial_post(&addr, "/v1/markets/LIM/trades", 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...so the next request is refused at once, with Retry-After; monitoring still answers.
    let (st, raw) = http_raw("POST", &trades, &[], Some(padded(100).into()))
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (503, Some("overloaded")),
        "{body}"
    );
    assert_eq!(
        http("GET", &format!("{}/healthz", s.http()), &[], None)
            .await
            .0,
        200
    );
    // The body timeout frees them: 408, and the slots are free again.
    let ((st1, t1), (st2, _)) = tokio::join!(read_status(&mut slow1), read_status(&mut slow2));
    assert_eq!((st1, st2), (408, 408), "{t1}");
    assert!(t1.contains("request_timeout"), "{t1}");
    let (st, body) = http("POST", &trades, &[], Some(&padded(100))).await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(seqs(&db.client().await, "LIM").await, vec![1, 2]);
    s.stop().await;
}
