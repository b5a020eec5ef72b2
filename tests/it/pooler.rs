//! Both roles behind a real PgBouncer (Debian's `pgbouncer`, 1.18) in
//! transaction mode (docs/OPERATIONS.md "Behind a pooler"): several writer
//! processes, with plain SQL writers beside them, answer exactly what the
//! log holds; a broadcaster refuses to start there rather than lose its
//! LISTEN; and the check behind that refusal passes a direct connection and
//! a session-mode pool.
//!
//! PgBouncer refuses to run as root: as root, it is started with its own
//! `-u postgres`. Its pool is kept smaller than the number of client
//! connections, so that statements of different clients share server
//! connections all the time, the condition that breaks named prepared
//! statements and session state.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::*;

/// Where Debian installs it (/usr/sbin, often not on a user's PATH).
fn pgbouncer_bin() -> PathBuf {
    let debian = Path::new("/usr/sbin/pgbouncer");
    if debian.exists() {
        return debian.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("pgbouncer"))
                .find(|f| f.exists())
        })
        .unwrap_or_else(|| {
            panic!("pgbouncer is not installed: `apt-get install pgbouncer` (.ci/run installs it)")
        })
}

/// A PgBouncer in front of the suite's cluster, stopped (and its directory
/// removed) on drop.
struct Bouncer {
    child: std::process::Child,
    dir: PathBuf,
    port: u16,
}

impl Bouncer {
    /// `mode` is `transaction` or `session`; `pool` server connections per
    /// user and database.
    async fn start(mode: &str, pool: u32) -> Bouncer {
        let bin = pgbouncer_bin();
        let server = url::Url::parse(&server_url()).unwrap();
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("mc-pgbouncer-{mode}-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Readable by the postgres user PgBouncer switches to.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The passwords of the test login roles: PgBouncer checks the
        // client's SCRAM against them and logs in to Postgres with them.
        let users = format!(
            "\"{WRITER_ROLE}\" \"{WRITER_PASSWORD}\"\n\"{BROADCASTER_ROLE}\" \"{BROADCASTER_PASSWORD}\"\n"
        );
        std::fs::write(dir.join("userlist.txt"), users).unwrap();
        let ini = format!(
            "[databases]\n\
             * = host={host} port={pgport}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {users}\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool}\n\
             max_client_conn = 500\n\
             logfile =\n\
             pidfile =\n",
            host = server.host_str().unwrap(),
            pgport = server.port().unwrap_or(5432),
            users = dir.join("userlist.txt").display(),
        );
        let ini_path = dir.join("pgbouncer.ini");
        std::fs::write(&ini_path, ini).unwrap();
        let mut cmd = std::process::Command::new(bin);
        // PgBouncer will not run as root.
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if root {
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(&ini_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("pgbouncer.log")).unwrap())
            .spawn()
            .expect("run pgbouncer");
        let b = Bouncer { child, dir, port };
        // Up once it takes connections.
        let up = tokio::time::timeout(WAIT, async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(up.is_ok(), "pgbouncer did not start: {}", b.log());
        b
    }

    /// `db` through this PgBouncer as `user`.
    fn url(&self, db: &TestDb, user: &str, password: &str) -> String {
        let mut u = url::Url::parse(&as_role(&db.url, user, password)).unwrap();
        u.set_port(Some(self.port)).unwrap();
        u.set_host(Some("127.0.0.1")).unwrap();
        u.to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill(); // already gone is fine
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real binary, its stderr in a file; killed on drop.
struct Proc {
    child: tokio::process::Child,
    stderr: PathBuf,
    addr: String,
}

impl Proc {
    /// A server: waits for its `listening on` line.
    async fn server(args: &[&str], name: &str) -> Proc {
        let stderr = std::env::temp_dir().join(format!(
            "marketcast-pooler-{}-{name}.log",
            std::process::id()
        ));
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_marketcast"))
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("run the marketcast binary");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the server printed its address in time")
            .unwrap()
            .unwrap_or_default();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first stdout line: {line}"))
            .to_string();
        Proc {
            child,
            stderr,
            addr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill(); // already gone is fine
        let _ = std::fs::remove_file(&self.stderr);
    }
}

const MARKETS: [&str; 4] = ["PB-A", "PB-B", "PB-C", "PB-D"];

/// One row of the log.
struct LogRow {
    market: String,
    seq: i64,
    /// The row as the fields of a writer's `trade` answer.
    fields: Value,
    coid: Option<String>,
}

/// What one plain SQL writer's INSERT returned: (market, seq, trade_id, coid).
type SqlWrite = (String, i64, i64, String);

#[tokio::test]
async fn writers_behind_pgbouncer_in_transaction_mode_answer_what_the_log_holds() {
    let db = TestDb::new().await;
    for m in MARKETS {
        db.market(m).await;
    }
    // Three server connections for three writers (16 pooled connections
    // each) and the SQL writers.
    let bouncer = Bouncer::start("transaction", 3).await;
    let url = bouncer.url(&db, WRITER_ROLE, WRITER_PASSWORD);
    let mut writers = Vec::new();
    for i in 0..3 {
        writers.push(Arc::new(
            Proc::server(
                &["writer", "--database-url", &url, "--listen", "127.0.0.1:0"],
                &format!("writer{i}"),
            )
            .await,
        ));
    }

    // Writer clients: each POST has a client_order_id; every third is
    // retried at another writer (must answer 200 with the original), and
    // every fifth is followed by a page read (must answer 200).
    let mut tasks = Vec::new();
    for w in 0..writers.len() {
        for k in 0..4 {
            let writers = writers.clone();
            tasks.push(tokio::spawn(async move {
                let mut answers: Vec<(String, u16, Value)> = Vec::new();
                for i in 0..30usize {
                    let market = MARKETS[(w + k + i) % MARKETS.len()];
                    let coid = format!("w{w}-{k}-{i}");
                    let body = json!({"side": if i % 2 == 0 {"yes"} else {"no"},
                        "price": format!("0.{:04}", 1 + (i * 37) % 9998), "qty": 1 + i as i64,
                        "client_order_id": coid});
                    let at = |n: usize| format!("http://{}", writers[n % writers.len()].addr);
                    let post = format!("{}/v1/markets/{market}/trades", at(w));
                    let (st, v) = http("POST", &post, &[], Some(&body.to_string())).await;
                    answers.push((coid.clone(), st, v));
                    if i % 3 == 0 {
                        let retry = format!("{}/v1/markets/{market}/trades", at(w + 1));
                        let (st, v) = http("POST", &retry, &[], Some(&body.to_string())).await;
                        answers.push((coid.clone(), st, v));
                    }
                    if i % 5 == 0 {
                        let page =
                            format!("{}/v1/markets/{market}/trades?after=0&limit=5", at(w + 2));
                        let (st, v) = http("GET", &page, &[], None).await;
                        assert_eq!(st, 200, "a page read through the pooler: {v}");
                        let (st, v) =
                            http("GET", &format!("{}/v1/markets/{market}", at(w)), &[], None).await;
                        assert_eq!(st, 200, "a market read through the pooler: {v}");
                    }
                }
                answers
            }));
        }
    }
    // Plain SQL writers beside them: one through PgBouncer (simple queries,
    // as psql would send), one directly to Postgres.
    let sql_tasks = [true, false].map(|through_bouncer| {
        let (url, db_url) = (url.clone(), db.url.clone());
        tokio::spawn(async move {
            let c = connect(if through_bouncer { &url } else { &db_url }).await;
            let mut out: Vec<SqlWrite> = Vec::new();
            for i in 0..40usize {
                let market = MARKETS[i % MARKETS.len()];
                let coid = format!("sql-{through_bouncer}-{i}");
                let sql = format!(
                    "INSERT INTO trades (market_id, side, price, qty, client_order_id) \
                     VALUES ('{market}', 'yes', 0.5, 1, '{coid}') RETURNING seq, trade_id"
                );
                let row = c
                    .simple_query(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("plain INSERT: {e:?}"))
                    .into_iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                            r.get(0).unwrap().parse().unwrap(),
                            r.get(1).unwrap().parse().unwrap(),
                        )),
                        _ => None,
                    })
                    .expect("RETURNING a row");
                out.push((market.to_string(), row.0, row.1, coid));
            }
            out
        })
    });

    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(
            tokio::time::timeout(WAIT * 4, t)
                .await
                .expect("writers in time")
                .unwrap(),
        );
    }
    let mut sql_writes = Vec::new();
    for t in sql_tasks {
        sql_writes.extend(t.await.unwrap());
    }

    // The log, read directly: each row as the fields of a `trade` answer.
    let c = db.client().await;
    let log: Vec<LogRow> = c
        .query(
            "SELECT market_id, seq, trade_id, side, price::text AS price, qty, client_order_id \
             FROM trades ORDER BY market_id, seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| LogRow {
            market: r.get("market_id"),
            seq: r.get("seq"),
            fields: json!({
                "market": r.get::<_, String>("market_id"),
                "seq": r.get::<_, i64>("seq"),
                "trade_id": r.get::<_, i64>("trade_id"),
                "side": r.get::<_, String>("side"),
                "price": r.get::<_, String>("price"),
                "qty": r.get::<_, i64>("qty"),
            }),
            coid: r.get("client_order_id"),
        })
        .collect();
    // Gapless per market, from 1.
    let mut per_market: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for row in &log {
        per_market.entry(&row.market).or_default().push(row.seq);
    }
    for (m, seqs) in &per_market {
        let want: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, &want, "market {m}: gapless seqs");
    }
    let by_coid: HashMap<&str, &LogRow> = log
        .iter()
        .filter_map(|row| row.coid.as_deref().map(|c| (c, row)))
        .collect();

    // Every answer is exactly a row of the log; the first answer of each
    // client_order_id is 201, every retry 200 with the same trade.
    let mut first: HashMap<&str, &Value> = HashMap::new();
    for (coid, st, v) in &answers {
        let row = by_coid
            .get(coid.as_str())
            .unwrap_or_else(|| panic!("{coid} answered {st} {v} but is not in the log"));
        assert_eq!(v["type"], "trade", "{coid}: {st} {v}");
        for (k, want) in row.fields.as_object().unwrap() {
            assert_eq!(&v[k], want, "{coid}: the answer's {k} is the log's: {v}");
        }
        match first.get(coid.as_str()) {
            None => {
                assert_eq!(*st, 201, "{coid}: first answer {v}");
                first.insert(coid, v);
            }
            Some(orig) => {
                assert_eq!(*st, 200, "{coid}: a retry answers 200");
                assert_eq!(&v, orig, "{coid}: a retry answers the original");
            }
        }
    }
    for (m, seq, trade_id, coid) in &sql_writes {
        let row = by_coid[coid.as_str()];
        assert_eq!(
            (
                &row.fields["market"],
                &row.fields["seq"],
                &row.fields["trade_id"]
            ),
            (&json!(m), &json!(seq), &json!(trade_id)),
            "{coid}"
        );
    }
    // Nothing in the log that nobody was told about.
    assert_eq!(
        log.len(),
        first.len() + sql_writes.len(),
        "every committed trade was answered"
    );
    assert_eq!(first.len(), 3 * 4 * 30);
    for w in &writers {
        assert!(
            !w.stderr().contains("does not exist"),
            "a writer hit a lost prepared statement: {}",
            w.stderr()
        );
    }
}

#[tokio::test]
async fn a_broadcaster_behind_a_transaction_pooler_refuses_to_start() {
    let db = TestDb::new().await;
    let bouncer = Bouncer::start("transaction", 2).await;
    let url = bouncer.url(&db, BROADCASTER_ROLE, BROADCASTER_PASSWORD);
    let mut b = Proc::server(
        &[
            "broadcaster",
            "--database-url",
            &url,
            "--listen",
            "127.0.0.1:0",
        ],
        "broadcaster",
    )
    .await;
    let status = tokio::time::timeout(WAIT, b.child.wait())
        .await
        .expect("the broadcaster exits in time")
        .unwrap();
    assert!(!status.success(), "exit status {status}");
    let err = b.stderr();
    assert!(
        err.contains("the database URL leads through a transaction-pooling proxy")
            && err.contains("Behind a pooler"),
        "a clear error: {err}"
    );
    assert!(!err.contains("LISTEN established"), "{err}");
}

#[tokio::test]
async fn the_session_check_passes_a_direct_connection_and_a_session_pool() {
    use marketcast::broadcaster::listener::check_own_session;
    let db = TestDb::new().await;
    let timeout = std::time::Duration::from_secs(5);
    let direct = db.broadcaster_url();
    ensure_roles(&server_url()).await;
    assert!(matches!(
        check_own_session(&direct, timeout).await,
        Ok(Ok(()))
    ));

    // A session pool needs a server per client: the check takes two (the
    // broadcaster itself many more).
    let session = Bouncer::start("session", 4).await;
    let url = session.url(&db, BROADCASTER_ROLE, BROADCASTER_PASSWORD);
    match check_own_session(&url, timeout).await {
        Ok(Ok(())) => {}
        other => panic!("a session pool: {other:?}"),
    }
    drop(session);
    // A pool of one server must hand it to the second connection; of four,
    // it hands the most recently released one.
    for pool in [1, 4] {
        let transaction = Bouncer::start("transaction", pool).await;
        let url = transaction.url(&db, BROADCASTER_ROLE, BROADCASTER_PASSWORD);
        match check_own_session(&url, timeout).await {
            Ok(Err(pooled)) => {
                assert!(
                    pooled.to_string().contains("transaction-pooling"),
                    "{pooled}"
                )
            }
            other => panic!("a transaction pool of {pool}: {other:?}"),
        }
    }
}
