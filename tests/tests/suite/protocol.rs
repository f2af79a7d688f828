//! The local-socket protocol against an in-process daemon: handshake, framing errors, bad
//! requests, concurrency, events and idle exit. Raw lines on the wire, as a plugin would send.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use interprocess::local_socket::traits::Stream as _;
use interprocess::local_socket::{GenericFilePath, Stream, ToFsName};
use serde_json::{Value, json};
use spark_tests::{Home, InProcess};

/// A raw NDJSON connection.
struct Raw {
    reader: BufReader<Stream>,
}

impl Raw {
    fn connect(d: &InProcess) -> Raw {
        let socket = d.home.layout().socket;
        let name = socket.to_fs_name::<GenericFilePath>().expect("name");
        Raw {
            reader: BufReader::new(Stream::connect(name).expect("connect")),
        }
    }

    fn send(&mut self, line: &[u8]) {
        self.reader.get_mut().write_all(line).expect("write");
    }

    fn send_json(&mut self, v: Value) {
        let mut line = serde_json::to_vec(&v).expect("json");
        line.push(b'\n');
        self.send(&line);
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read");
        assert!(n > 0, "daemon closed the connection");
        serde_json::from_str(&line).expect("daemon sent invalid JSON")
    }

    fn call(&mut self, v: Value) -> Value {
        self.send_json(v);
        self.recv()
    }

    fn initialize(&mut self) {
        let r = self.call(json!({"jsonrpc":"2.0","id":0,"method":"initialize",
            "params":{"protocol_version": spark_proto::PROTOCOL_VERSION, "client":{"name":"raw","version":"0"}}}));
        assert_eq!(
            r["result"]["protocol_version"],
            spark_proto::PROTOCOL_VERSION,
            "{r}"
        );
    }
}

fn status_req(id: Value) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"status"})
}

#[test]
fn wrong_protocol_version_gets_a_clear_error_and_the_connection_stays_usable() {
    let d = InProcess::start();
    let mut c = Raw::connect(&d);
    let r = c.call(json!({"jsonrpc":"2.0","id":1,"method":"initialize",
        "params":{"protocol_version": 999, "client":{"name":"old-plugin","version":"9"}}}));
    assert_eq!(r["id"], 1);
    assert_eq!(r["error"]["code"], -32001, "{r}");
    let msg = r["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains("protocol version mismatch") && msg.contains("999"),
        "{msg}"
    );
    assert!(r["error"]["data"]["hint"].as_str().is_some(), "{r}");

    // Still not initialized: other requests are refused until a good handshake.
    let r = c.call(status_req(json!(2)));
    assert_eq!(r["error"]["code"], -32000, "{r}");
    c.initialize();
    let r = c.call(status_req(json!(3)));
    assert_eq!(r["result"]["pid"], std::process::id(), "{r}");
}

#[test]
fn requests_before_initialize_are_refused() {
    let d = InProcess::start();
    let mut c = Raw::connect(&d);
    let r = c.call(status_req(json!("s")));
    assert_eq!(r["id"], "s");
    assert_eq!(r["error"]["code"], -32000);
    assert!(
        r["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("initialize"),
        "{r}"
    );
}

#[test]
fn malformed_and_oversized_lines_get_errors_and_the_connection_survives() {
    let d = InProcess::start();
    let mut c = Raw::connect(&d);
    c.initialize();

    c.send(b"this is not json\n");
    let r = c.recv();
    assert_eq!(
        (r["id"].clone(), r["error"]["code"].clone()),
        (Value::Null, json!(-32700)),
        "{r}"
    );

    c.send(b"{\"jsonrpc\":\"2.0\",\"id\":5}\n");
    let r = c.recv();
    assert_eq!(
        (r["id"].clone(), r["error"]["code"].clone()),
        (json!(5), json!(-32600)),
        "{r}"
    );

    c.send(b"{\"jsonrpc\":\"1.0\",\"id\":6,\"method\":\"status\"}\n");
    assert_eq!(c.recv()["error"]["code"], -32600);

    c.send(b"[1,2,3]\n");
    assert_eq!(c.recv()["error"]["code"], -32600);
    // An array is a batch to JSON-RPC 2.0, never one request, even when shaped like one.
    c.send(b"[\"2.0\",11,\"status\"]\n");
    let r = c.recv();
    assert_eq!(
        (r["id"].clone(), r["error"]["code"].clone()),
        (Value::Null, json!(-32600)),
        "{r}"
    );

    // Invalid UTF-8 is a parse error, not a dead connection.
    c.send(b"{\"x\":\"\xff\xfe\"}\n");
    assert_eq!(c.recv()["error"]["code"], -32700);

    // One byte over the limit, sent in pieces: skipped whole, answered once.
    let mut big = vec![b' '; spark_proto::MAX_LINE_BYTES + 1];
    big.push(b'\n');
    c.send(&big);
    let r = c.recv();
    assert_eq!(r["error"]["code"], -32002, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("exceeds the limit"),
        "{r}"
    );

    let r = c.call(json!({"jsonrpc":"2.0","id":7,"method":"no/such"}));
    assert_eq!(r["error"]["code"], -32601, "{r}");
    let r = c.call(json!({"jsonrpc":"2.0","id":8,"method":"status","params":{"bogus":1}}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = c.call(json!({"jsonrpc":"2.0","id":9,"method":"status","params":[]}));
    assert_eq!(r["error"]["code"], -32602, "{r}");

    // Notifications (no id) are never answered: the next answer is for id 10.
    c.send_json(json!({"jsonrpc":"2.0","method":"status"}));
    let r = c.call(status_req(json!(10)));
    assert_eq!(r["id"], 10, "{r}");
    assert!(r["result"].is_object(), "{r}");

    // The daemon still serves new connections.
    let mut other = Raw::connect(&d);
    other.initialize();
    assert!(other.call(status_req(json!(1)))["result"].is_object());
}

#[test]
fn thirty_two_clients_times_two_hundred_requests_are_all_answered_uncrossed() {
    const CLIENTS: usize = 32;
    const REQUESTS: usize = 200;
    let d = InProcess::start();
    std::thread::scope(|s| {
        for client in 0..CLIENTS {
            let d = &d;
            s.spawn(move || {
                let mut c = Raw::connect(d);
                c.initialize();
                // Pipelined: every request is written before any answer is read.
                let mut batch = Vec::new();
                for n in 0..REQUESTS {
                    batch.extend(
                        serde_json::to_vec(&status_req(json!(format!("c{client}-r{n}"))))
                            .expect("json"),
                    );
                    batch.push(b'\n');
                }
                c.send(&batch);
                for n in 0..REQUESTS {
                    let r = c.recv();
                    assert_eq!(r["id"], format!("c{client}-r{n}"), "lost or crossed answer");
                    assert_eq!(r["result"]["pid"], std::process::id());
                }
            });
        }
    });
    // And the daemon is still healthy for the next client.
    d.client()
        .call::<spark_proto::methods::Status>(&Default::default())
        .expect("status");
}

#[test]
fn subscribers_hear_the_daemon_stop_and_see_the_connection_close() {
    let d = InProcess::start();
    let mut sub = Raw::connect(&d);
    sub.initialize();
    let r = sub.call(json!({"jsonrpc":"2.0","id":1,"method":"subscribe"}));
    assert_eq!(r["result"], json!({}), "{r}");

    let mut ctl = Raw::connect(&d);
    ctl.initialize();
    let r = ctl.call(json!({"jsonrpc":"2.0","id":2,"method":"shutdown"}));
    assert_eq!(r["result"], json!({}), "{r}");

    let n = sub.recv();
    assert_eq!(n["method"], "event");
    assert_eq!(n["params"], json!({"type":"stopping"}));
    let mut rest = String::new();
    assert_eq!(
        sub.reader.read_line(&mut rest).expect("read"),
        0,
        "connection closed after stopping"
    );
    let socket = d.home.layout().socket;
    d.stop();
    assert!(!socket.exists(), "socket removed on shutdown");
}

#[test]
fn idle_timeout_stops_a_daemon_nobody_uses() {
    let home = Home::new();
    let mut config = home.config();
    config.idle_timeout = Some(Duration::from_millis(100));
    let d = InProcess::start_with(home, config);
    let socket = d.home.layout().socket;
    {
        let mut c = d.client();
        c.call::<spark_proto::methods::Status>(&Default::default())
            .expect("status");
        // A subscriber that goes away must not keep its connection (or the daemon) alive.
        let mut sub = d.client();
        sub.call::<spark_proto::methods::Subscribe>(&Default::default())
            .expect("subscribe");
    }
    assert!(
        d.join_within(Duration::from_secs(20)),
        "daemon did not exit when idle"
    );
    assert!(!socket.exists());
}
