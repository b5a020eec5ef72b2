//! The machine-readable contract checked against everything the suite
//! receives: `docs/asyncapi.yaml` (WebSocket messages, SSE events) and
//! `docs/openapi.yaml` (both roles' HTTP answers).
//!
//! Both files are loaded once per run. `support::next_event` hands every
//! WebSocket text frame that is a JSON object with a `type` to
//! [`check_ws`], which validates it against the AsyncAPI schema whose
//! `type` is that constant; the HTTP helpers hand every answer to
//! [`check_http`], which finds the OpenAPI operation by path and method,
//! the response by status, checks the headers marked `required` and
//! validates a JSON body against the response's schema. A violation panics
//! with the message, the schema's name and each schema error, so any test
//! that receives a frame or a body the contract does not allow fails there.
//!
//! Routes the document does not name (a 404 `not_found` path, a method a
//! route does not serve) must still answer errors in the shape of
//! `ErrorBody`. Bodies that are not JSON are checked only where the
//! document promises JSON.
//!
//! Where the server and the contract (PROTOCOL-1.1.md) disagree, the
//! contract decides and the schema says what it says; a disagreement that is
//! known and waiting for a fix in `src/` is listed in [`KNOWN_DEVIATIONS`]
//! with its section, and only exactly that error is let through.
//!
//! The YAML is read with `yaml-rust2` (pure Rust, YAML 1.2, so an unquoted
//! `no` stays a string) and converted to `serde_json::Value`; `jsonschema`
//! validates, with `format` checked. AsyncAPI 3.0 payloads are draft-07
//! (the AsyncAPI schema format's base), OpenAPI 3.1 schemas are 2020-12.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use jsonschema::{Draft, Validator};
use serde_json::{json, Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

const ASYNCAPI_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/asyncapi.yaml");
const OPENAPI_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");

/// A disagreement between the server and the contract that is known and
/// reported (the contract decides; the fix belongs in `src/`). An error is
/// let through only when its keyword location (the schema path without
/// `$ref` hops) is `schema_path` and its text contains `error_contains`.
struct Deviation {
    schema_path: &'static str,
    error_contains: &'static str,
    /// Where the contract says otherwise, and what the server does.
    #[allow(dead_code)]
    spec: &'static str,
}

/// Known disagreements between the servers and PROTOCOL-1.1.md. Each is a
/// bug in `src/` (or a part of 1.1 not built yet); remove the entry with
/// the fix, and the schema then holds the server to the contract.
const KNOWN_DEVIATIONS: &[Deviation] = &[];

/// Parse a YAML file into JSON (keys become strings).
pub fn load_yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"));
    assert_eq!(docs.len(), 1, "{path} holds one YAML document");
    yaml_to_json(&docs[0]).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_to_json(y: &Yaml) -> Result<Value, String> {
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => {
            let f: f64 = r.parse().map_err(|_| format!("not a number: {r}"))?;
            serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| format!("not a finite number: {r}"))?
        }
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect::<Result<_, _>>()?),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("unsupported key {other:?}")),
                };
                if m.insert(key.clone(), yaml_to_json(v)?).is_some() {
                    return Err(format!("duplicate key {key}"));
                }
            }
            Value::Object(m)
        }
        Yaml::Alias(_) | Yaml::BadValue => return Err(format!("unsupported YAML {y:?}")),
    })
}

/// A validator for `schema`, whose `$ref`s point into `doc`'s
/// `components/schemas`.
pub fn compile(doc: &Value, schema: &Value, draft: Draft) -> Validator {
    let root = json!({
        "allOf": [schema],
        "components": {"schemas": doc["components"]["schemas"]},
    });
    jsonschema::options()
        .with_draft(draft)
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
}

/// Every `$ref` in `v` (with its JSON pointer location), for the check that
/// each one resolves.
pub fn refs(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    if let Some(r) = x.as_str() {
                        out.push((at.to_string(), r.to_string()));
                    }
                } else {
                    refs(
                        x,
                        &format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                        out,
                    );
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                refs(x, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// `#/a/b` of `doc`, following nothing.
pub fn resolve<'a>(doc: &'a Value, r: &str) -> Option<&'a Value> {
    doc.pointer(r.strip_prefix('#')?)
}

/// An object that may be a `$ref` to another in the same document.
fn deref<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(doc, r).unwrap_or_else(|| panic!("unresolved $ref {r}")),
        None => v,
    }
}

/// The WebSocket side: a validator per server message `type`.
pub struct AsyncApi {
    pub doc: Value,
    /// `type` constant -> (schema name, validator).
    by_type: BTreeMap<String, (String, Validator)>,
}

pub static ASYNCAPI: LazyLock<AsyncApi> = LazyLock::new(|| {
    let doc = load_yaml(ASYNCAPI_PATH);
    let mut by_type = BTreeMap::new();
    let schemas = doc["components"]["schemas"]
        .as_object()
        .expect("asyncapi components/schemas");
    // The WebSocket server messages: the schemas that fix `type` (the SSE
    // `end` event is not a WebSocket message).
    for (name, s) in schemas {
        if let Some(t) = s.pointer("/properties/type/const").and_then(Value::as_str) {
            if name.starts_with("Sse") {
                continue;
            }
            let v = compile(
                &doc,
                &json!({"$ref": format!("#/components/schemas/{name}")}),
                Draft::Draft7,
            );
            assert!(
                by_type.insert(t.to_string(), (name.clone(), v)).is_none(),
                "two schemas for type {t}"
            );
        }
    }
    AsyncApi { doc, by_type }
});

impl AsyncApi {
    /// A validator of the named schema.
    pub fn schema(&self, name: &str) -> Validator {
        let r = format!("#/components/schemas/{name}");
        assert!(resolve(&self.doc, &r).is_some(), "no schema {name}");
        compile(&self.doc, &json!({"$ref": r}), Draft::Draft7)
    }

    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.by_type.keys().map(String::as_str)
    }
}

/// Panic unless `v` (a WebSocket text frame from the server) is allowed by
/// the schema of its `type`. Frames without a string `type` are left alone.
pub fn check_ws(v: &Value) {
    let Some(t) = v.get("type").and_then(Value::as_str) else {
        return;
    };
    let Some((name, validator)) = ASYNCAPI.by_type.get(t) else {
        panic!(
            "contract violation: WebSocket message of unknown type {t:?} (docs/asyncapi.yaml knows {:?}): {v}",
            ASYNCAPI.by_type.keys().collect::<Vec<_>>()
        );
    };
    enforce(validator, name, v, &format!("WebSocket message {v}"));
}

/// Panic unless `data` is allowed as the payload of the SSE event named
/// `event`: the message of `docs/asyncapi.yaml`'s `sse` channel with that
/// `name`.
pub fn check_sse(event: &str, data: &Value) {
    static BY_EVENT: LazyLock<BTreeMap<String, (String, Validator)>> = LazyLock::new(|| {
        let doc = &ASYNCAPI.doc;
        let messages = doc["channels"]["sse"]["messages"]
            .as_object()
            .expect("asyncapi channels/sse/messages");
        messages
            .values()
            .map(|m| {
                let m = resolve(doc, m["$ref"].as_str().expect("a message $ref"))
                    .expect("the message resolves");
                let name = m["name"].as_str().expect("an SSE message has a name");
                let schema = m["payload"]["$ref"].as_str().expect("a payload $ref");
                let v = compile(doc, &json!({"$ref": schema}), Draft::Draft7);
                (name.to_string(), (schema.to_string(), v))
            })
            .collect()
    });
    let Some((schema, validator)) = BY_EVENT.get(event) else {
        panic!("contract violation: SSE event {event:?} is not in docs/asyncapi.yaml: {data}");
    };
    enforce(
        validator,
        schema,
        data,
        &format!("SSE event {event}: {data}"),
    );
}

/// Validate and panic on any error that is not a known deviation.
fn enforce(validator: &Validator, schema: &str, v: &Value, what: &str) {
    let errors: Vec<String> = validator
        .iter_errors(v)
        .filter(|e| {
            let text = e.to_string();
            !KNOWN_DEVIATIONS.iter().any(|d| {
                d.schema_path == e.schema_path().as_str() && text.contains(d.error_contains)
            })
        })
        .map(|e| {
            format!(
                "  at {:?} ({}): {e}",
                e.instance_path().as_str(),
                e.schema_path().as_str()
            )
        })
        .collect();
    if !errors.is_empty() {
        panic!(
            "contract violation: {what} is not allowed by schema {schema}:\n{}",
            errors.join("\n")
        );
    }
}

/// One documented response: its body's validator (JSON only) and its
/// required headers with their validators.
struct Response {
    name: String,
    json: Option<Validator>,
    /// Whether the response documents a body of another media type.
    other_body: bool,
    headers: Vec<(String, Validator)>,
}

/// The HTTP side: the document's operations, by path template and method.
pub struct OpenApi {
    pub doc: Value,
    /// Path templates split into segments (`None` for `{param}`).
    paths: Vec<(String, Vec<Option<String>>)>,
    /// (template, method, status) -> response.
    responses: BTreeMap<(String, String, String), Response>,
    error_body: Validator,
}

pub static OPENAPI: LazyLock<OpenApi> = LazyLock::new(|| {
    let doc = load_yaml(OPENAPI_PATH);
    let mut paths = Vec::new();
    let mut responses = BTreeMap::new();
    for (template, item) in doc["paths"].as_object().expect("openapi paths") {
        let segs = template
            .split('/')
            .map(|s| (!s.starts_with('{')).then(|| s.to_string()))
            .collect();
        paths.push((template.clone(), segs));
        for (method, op) in item.as_object().expect("a path item") {
            let Some(rs) = op.get("responses").and_then(Value::as_object) else {
                continue;
            };
            for (status, r) in rs {
                let r = deref(&doc, r);
                let content = r.get("content").and_then(Value::as_object);
                let json_schema = content
                    .and_then(|c| c.get("application/json"))
                    .map(|m| &m["schema"]);
                let other_body = content.is_some_and(|c| c.keys().any(|k| k != "application/json"));
                let mut headers = Vec::new();
                for (h, hv) in r
                    .get("headers")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    let hv = deref(&doc, hv);
                    if hv["required"] == true {
                        headers.push((h.clone(), compile(&doc, &hv["schema"], Draft::Draft202012)));
                    }
                }
                responses.insert(
                    (template.clone(), method.to_uppercase(), status.clone()),
                    Response {
                        name: format!("{} {template} {status}", method.to_uppercase()),
                        json: json_schema.map(|s| compile(&doc, s, Draft::Draft202012)),
                        other_body,
                        headers,
                    },
                );
            }
        }
    }
    let error_body = compile(
        &doc,
        &json!({"$ref": "#/components/schemas/ErrorBody"}),
        Draft::Draft202012,
    );
    OpenApi {
        doc,
        paths,
        responses,
        error_body,
    }
});

impl OpenApi {
    /// The template matching `path` (a trailing slash ignored), literal
    /// segments preferred.
    fn template(&self, path: &str) -> Option<&str> {
        let path = match path.strip_suffix('/') {
            Some(p) if !p.is_empty() => p,
            _ => path,
        };
        let segs: Vec<&str> = path.split('/').collect();
        self.paths
            .iter()
            .filter(|(_, t)| {
                t.len() == segs.len()
                    && t.iter().zip(&segs).all(|(t, s)| match t {
                        Some(lit) => lit == s,
                        None => !s.is_empty(),
                    })
            })
            .min_by_key(|(_, t)| t.iter().filter(|s| s.is_none()).count())
            .map(|(p, _)| p.as_str())
    }

    fn has_method(&self, template: &str, method: &str) -> bool {
        self.doc["paths"][template]
            .get(method.to_lowercase())
            .is_some()
    }

    /// A validator of the named schema.
    pub fn schema(&self, name: &str) -> Validator {
        let r = format!("#/components/schemas/{name}");
        assert!(resolve(&self.doc, &r).is_some(), "no schema {name}");
        compile(&self.doc, &json!({"$ref": r}), Draft::Draft202012)
    }
}

/// Panic unless the answer to `method url` (`status`, `headers`, `body`) is
/// one the OpenAPI document allows.
pub fn check_http(method: &str, url: &str, status: u16, headers: &hyper::HeaderMap, body: &[u8]) {
    let api = &*OPENAPI;
    let path = url::Url::parse(url)
        .map(|u| u.path().to_string())
        .unwrap_or_default();
    let what = || {
        format!(
            "{method} {path} answered {status} with {}",
            String::from_utf8_lossy(&body[..body.len().min(2000)])
        )
    };
    let status_s = status.to_string();
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let template = api.template(&path);
    // The operation answering: the method's, or GET's for a route that
    // serves any method (/healthz) or a HEAD.
    let response = template.and_then(|t| {
        let m = method.to_uppercase();
        let key = |m: &str| (t.to_string(), m.to_string(), status_s.clone());
        api.responses.get(&key(&m)).or_else(|| {
            (!api.has_method(t, &m) && status != 405)
                .then(|| api.responses.get(&key("GET")))
                .flatten()
        })
    });
    let Some(response) = response else {
        // Not a documented answer: only the generic error shape is allowed
        // (404 for any path, 405 for a method a route does not serve, the
        // connection-level 400/408/503 of hostile and limit tests).
        if status >= 400 {
            match &json {
                Some(v) => enforce(&api.error_body, "ErrorBody", v, &what()),
                None => panic!(
                    "contract violation: {} (an error body must be JSON)",
                    what()
                ),
            }
        } else if json.is_some() && status != 101 {
            panic!(
                "contract violation: {} (no such answer in docs/openapi.yaml)",
                what()
            );
        }
        return;
    };
    for (name, validator) in &response.headers {
        let Some(value) = headers.get(name.as_str()) else {
            panic!(
                "contract violation: {} lacks the header {name} ({})",
                what(),
                response.name
            );
        };
        let v = Value::String(value.to_str().unwrap_or("").to_string());
        enforce(validator, &format!("header {name}"), &v, &what());
    }
    if method.eq_ignore_ascii_case("HEAD") || status == 101 || status == 204 || status == 304 {
        return;
    }
    match (&response.json, &json) {
        (Some(validator), Some(v)) => enforce(validator, &response.name, v, &what()),
        (Some(_), None) if !response.other_body => {
            panic!("contract violation: {} (the body must be JSON)", what())
        }
        _ => {}
    }
}

/// Every `$ref` of both documents resolves, and every schema compiles.
#[test]
fn the_contract_files_parse_and_every_ref_resolves() {
    for doc in [&ASYNCAPI.doc, &OPENAPI.doc] {
        let mut all = Vec::new();
        refs(doc, "#", &mut all);
        assert!(all.len() > 50, "the documents are made of references");
        for (at, r) in all {
            assert!(r.starts_with("#/"), "{at}: only local references ({r})");
            assert!(
                resolve(doc, &r).is_some(),
                "{at}: $ref {r} does not resolve"
            );
        }
    }
    assert_eq!(ASYNCAPI.doc["asyncapi"], "3.0.0");
    assert_eq!(OPENAPI.doc["openapi"], "3.1.0");
    for (doc, draft) in [
        (&ASYNCAPI.doc, Draft::Draft7),
        (&OPENAPI.doc, Draft::Draft202012),
    ] {
        for name in doc["components"]["schemas"].as_object().unwrap().keys() {
            compile(
                doc,
                &json!({"$ref": format!("#/components/schemas/{name}")}),
                draft,
            );
        }
    }
    let types: Vec<&str> = ASYNCAPI.types().collect();
    assert_eq!(
        types,
        [
            "authed",
            "error",
            "head",
            "pong",
            "subscribed",
            "ticker",
            "trade",
            "unsubscribed"
        ]
    );
    // Every server message type is a message of the WebSocket channel.
    let names: Vec<&str> = ASYNCAPI.doc["channels"]["websocket"]["messages"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for t in types {
        assert!(names.contains(&t), "channel websocket lacks message {t}");
    }
    assert!(!OPENAPI.responses.is_empty());
}

fn valid(v: &Validator, text: &str) {
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let errors: Vec<String> = v.iter_errors(&value).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{text}: {errors:?}");
}

fn invalid(v: &Validator, value: Value) {
    assert!(!v.is_valid(&value), "accepted: {value}");
}

/// The json blocks of PROTOCOL-1.1.md (and v1's client ops), verbatim.
#[test]
fn the_examples_of_the_contract_validate() {
    let op = ASYNCAPI.schema("ClientOp");
    for text in [
        // v1 §2
        r#"{"op":"subscribe","market":"ELECTION-2028","from_seq":1041,"epoch":"e1","id":7}"#,
        r#"{"op":"unsubscribe","market":"ELECTION-2028","id":8}"#,
        r#"{"op":"ping","id":9}"#,
        // 1.1 §2.2, §2.3, §2.4
        r#"{"op":"auth","token":"eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE3OTYwMDAwMDB9.c2ln","id":3}"#,
        r#"{"op":"subscribe","market":"ELECTION-2028","recent":50,"mode":"ticker","interval_ms":250,"heads":true,"id":7}"#,
        r#"{"op":"subscribe","markets":[{"market":"A","from_seq":10,"epoch":"e1"},{"market":"B"},{"market":"C","mode":"ticker"}],"id":1}"#,
        r#"{"op":"unsubscribe","markets":["A","Z"],"id":2}"#,
    ] {
        valid(&op, text);
    }
    // Server messages, each by its type.
    for text in [
        // §2.2
        r#"{"type":"authed","id":3,"exp":1796000000}"#,
        r#"{"type":"error","id":3,"code":"invalid_token","message":"token expired"}"#,
        // §2.4
        r#"{"type":"subscribed","id":1,"market":"A","epoch":"e1","head_seq":11,"last_price":"0.5000","volume":40,"from_seq":10,"mode":"trades","heads":false,"protocol":"1.1"}"#,
        r#"{"type":"trade","market":"A","seq":11,"trade_id":901,"side":"no","price":"0.5000","qty":4,"ts":"2026-11-27T05:31:02.123456Z"}"#,
        r#"{"type":"subscribed","id":1,"market":"B","epoch":"e7","head_seq":0,"last_price":null,"volume":0,"from_seq":0,"mode":"trades","heads":false,"protocol":"1.1"}"#,
        r#"{"type":"error","id":1,"market":"C","code":"unknown_market","message":"no market named C"}"#,
        r#"{"type":"unsubscribed","id":2,"market":"A"}"#,
        r#"{"type":"error","id":2,"market":"Z","code":"not_subscribed","message":"not subscribed to Z"}"#,
        // §2.6, §2.7, §2.8
        r#"{"type":"ticker","market":"ELECTION-2028","from_seq":1042,"to_seq":1050,"count":9,"qty":310,"volume":120034,"open":"0.6200","high":"0.6400","low":"0.6100","last_price":"0.6300","ts":"2026-11-27T05:31:02.123456Z"}"#,
        r#"{"type":"head","market":"ELECTION-2028","head_seq":1050,"ts":"2026-11-27T05:31:07.000112Z"}"#,
        r#"{"type":"subscribed","id":7,"market":"ELECTION-2028","epoch":"e1","head_seq":1050,"last_price":"0.6300","volume":120034,"from_seq":1000,"mode":"ticker","interval_ms":250,"heads":true,"head_interval_ms":5000,"protocol":"1.1"}"#,
        // §5.2
        r#"{"type":"error","id":7,"market":"ELECTION-2028","code":"wrong_shard","shard":3,"url":"wss://feed-b.example/ws","broadcasters":["wss://feed-a.example/ws","wss://feed-b.example/ws"],"message":"market ELECTION-2028 is on shard 3 which this broadcaster does not serve"}"#,
        // v1 §2 (the trade and pong are unchanged in 1.1)
        r#"{"type":"trade","market":"ELECTION-2028","seq":1042,"trade_id":88123,"side":"yes","price":"0.6300","qty":25,"ts":"2026-11-27T05:31:02.123456Z"}"#,
        r#"{"type":"pong","id":9}"#,
    ] {
        let v: Value = serde_json::from_str(text).unwrap();
        check_ws(&v);
    }
    // §3.2: the data lines of the SSE example, by event.
    for (schema, text) in [
        (
            "SseSubscribed",
            r#"{"type":"subscribed","market":"ELECTION-2028","epoch":"e1","head_seq":1050,"last_price":"0.6300","volume":120034,"from_seq":1041,"mode":"trades","heads":true,"head_interval_ms":5000,"protocol":"1.1"}"#,
        ),
        (
            "Trade",
            r#"{"type":"trade","market":"ELECTION-2028","seq":1042,"trade_id":88123,"side":"yes","price":"0.6300","qty":25,"ts":"2026-11-27T05:31:02.123456Z"}"#,
        ),
        (
            "Head",
            r#"{"type":"head","market":"ELECTION-2028","head_seq":1050,"ts":"2026-11-27T05:31:07.000112Z"}"#,
        ),
        (
            "SseEnd",
            r#"{"type":"end","code":"token_expired","message":"token expired; reconnect with a fresh token and Last-Event-ID"}"#,
        ),
    ] {
        valid(&ASYNCAPI.schema(schema), text);
    }
    // HTTP bodies: §3.3, §4.2, §6 (broadcaster, then writer).
    for (schema, text) in [
        (
            "PollPage",
            r#"{"trades":[{"type":"trade","market":"ELECTION-2028","seq":1042,"trade_id":88123,"side":"yes","price":"0.6300","qty":25,"ts":"2026-11-27T05:31:02.123456Z"}],"head_seq":1050}"#,
        ),
        (
            "Market",
            r#"{"market":"ELECTION-2028","title":"Who wins?","status":"open","shard":3,"epoch":"e1","head_seq":1050,"last_price":"0.6300","volume":120034,"broadcasters":["wss://feed-a.example/ws","wss://feed-b.example/ws"]}"#,
        ),
        (
            "Health",
            r#"{"status":"ok","database":true,"listen":true,"connections":12,"protocol":"1.1","replica":true,"registered":true}"#,
        ),
        ("Health", r#"{"status":"ok","protocol":"1.1"}"#),
        (
            "ErrorBody",
            r#"{"error":{"code":"unauthorized","message":"..."}}"#,
        ),
    ] {
        valid(&OPENAPI.schema(schema), text);
    }
}

/// The schemas refuse what the contract refuses (a schema that accepts
/// everything would pass every test above).
#[test]
fn the_schemas_refuse_what_the_contract_refuses() {
    let trade = json!({"type":"trade","market":"ELECTION-2028","seq":1042,"trade_id":88123,"side":"yes","price":"0.6300","qty":25,"ts":"2026-11-27T05:31:02.123456Z"});
    let t = ASYNCAPI.schema("Trade");
    assert!(t.is_valid(&trade));
    let with = |k: &str, v: Value| {
        let mut x = trade.clone();
        x[k] = v;
        x
    };
    invalid(&t, with("price", json!("0.63")));
    invalid(&t, with("price", json!(0.63)));
    invalid(&t, with("ts", json!("2026-11-27T05:31:02.123Z")));
    invalid(&t, with("ts", json!("2026-11-27T05:31:02.123456+00:00")));
    invalid(&t, with("ts", json!("2026-13-27T05:31:02.123456Z")));
    invalid(&t, with("market", json!("-bad")));
    invalid(&t, with("side", json!("maybe")));
    invalid(&t, with("seq", json!(0)));
    invalid(&t, with("qty", json!(1_000_000_001)));
    let mut missing = trade.clone();
    missing.as_object_mut().unwrap().remove("trade_id");
    invalid(&t, missing);
    // Unknown fields are allowed: clients ignore them.
    assert!(t.is_valid(&with("later_field", json!(1))));

    let s = ASYNCAPI.schema("Subscribed");
    let sub = json!({"type":"subscribed","market":"A","epoch":"e1","head_seq":0,"last_price":null,"volume":0,"from_seq":0,"mode":"trades","heads":false,"protocol":"1.1"});
    assert!(s.is_valid(&sub));
    let mut ticker_without_interval = sub.clone();
    ticker_without_interval["mode"] = "ticker".into();
    invalid(&s, ticker_without_interval);
    let mut heads_without_interval = sub.clone();
    heads_without_interval["heads"] = true.into();
    invalid(&s, heads_without_interval);
    let mut v1 = sub.clone();
    v1.as_object_mut().unwrap().remove("protocol");
    invalid(&s, v1);
    let mut sse = sub.clone();
    sse["id"] = 1.into();
    invalid(&ASYNCAPI.schema("SseSubscribed"), sse);

    let e = ASYNCAPI.schema("Error");
    invalid(
        &e,
        json!({"type":"error","code":"epoch_mismatch","market":"A","message":"m"}),
    );
    invalid(
        &e,
        json!({"type":"error","code":"no_such_code","message":"m"}),
    );
    invalid(
        &e,
        json!({"type":"error","code":"unknown_market","message":"m"}),
    );

    let op = ASYNCAPI.schema("ClientOp");
    invalid(
        &op,
        json!({"op":"subscribe","market":"A","markets":[{"market":"B"}]}),
    );
    invalid(&op, json!({"op":"subscribe","markets":[]}));
    invalid(
        &op,
        json!({"op":"subscribe","market":"A","from_seq":1,"recent":5}),
    );
    invalid(
        &op,
        json!({"op":"subscribe","market":"A","interval_ms":250}),
    );
    invalid(
        &op,
        json!({"op":"unsubscribe","market":"A","markets":["A"]}),
    );

    let body = OPENAPI.schema("ErrorBody");
    invalid(&body, json!({"code":"invalid","message":"m"}));
    invalid(&body, json!({"error":{"code":"invalid"}}));
    invalid(
        &OPENAPI.schema("Error401"),
        json!({"error":{"code":"forbidden","message":"m"}}),
    );
}

/// The route matcher picks the literal route and ignores a trailing slash.
#[test]
fn routes_are_matched_like_the_servers_do() {
    assert_eq!(OPENAPI.template("/v1/markets"), Some("/v1/markets"));
    assert_eq!(OPENAPI.template("/v1/markets/"), Some("/v1/markets"));
    assert_eq!(OPENAPI.template("/v1/markets/A"), Some("/v1/markets/{id}"));
    assert_eq!(
        OPENAPI.template("/v1/markets/A/trades"),
        Some("/v1/markets/{id}/trades")
    );
    assert_eq!(OPENAPI.template("/v1/markets//trades"), None);
    assert_eq!(OPENAPI.template("/nope"), None);
}
