//! The QMP commands of the control socket: one request line to one reply, QEMU's names and
//! shapes (see the parent module for the list). Kept apart from the socket so that the
//! replies can be tested without one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdmig_transport::session::{MigrationControl, Phase};
use serde_json::{json, Map, Value};

use super::super::End;

/// QEMU's largest `downtime-limit`, ms.
const MAX_DOWNTIME_MS: u64 = 2_000_000;

/// What the commands act on.
pub struct Commands {
    /// The migration's control.
    pub control: MigrationControl,
    /// This end.
    pub end: End,
    /// Page size (the `ram` figures in pages).
    pub page_size: u64,
    /// Runs after `migrate_cancel` succeeded.
    pub on_cancel: Box<dyn Fn() + Send>,
}

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({"error": {"class": class, "desc": desc.into()}})
}

fn generic(desc: impl Into<String>) -> Value {
    error("GenericError", desc)
}

fn ok() -> Value {
    json!({"return": {}})
}

/// An error for a request line longer than `max` bytes.
pub fn too_long(max: usize) -> Value {
    generic(format!("QMP input longer than {max} bytes"))
}

/// The `MIGRATION` event for `phase`, stamped now.
pub fn event(phase: Phase) -> Value {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({
        "event": "MIGRATION",
        "data": {"status": phase.name()},
        "timestamp": {"seconds": t.as_secs(), "microseconds": t.subsec_micros()},
    })
}

/// QMP's greeting, with rdmig's version in QEMU's version shape.
pub fn greeting() -> Value {
    let v = env!("CARGO_PKG_VERSION");
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor, micro) = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    json!({"QMP": {
        "version": {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": format!("rdmig rdma-bench {v}"),
        },
        "capabilities": [],
    }})
}

impl Commands {
    /// One request line to its reply.
    pub fn handle(&self, line: &[u8], negotiated: &mut bool, status: Phase) -> Value {
        let v: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => return generic(format!("JSON parse error, {e}")),
        };
        let Some(req) = v.as_object() else {
            return generic("QMP input must be a JSON object");
        };
        let mut reply = self.execute(req, negotiated, status);
        if let (Some(id), Some(r)) = (req.get("id"), reply.as_object_mut()) {
            r.insert("id".into(), id.clone());
        }
        reply
    }

    fn execute(&self, req: &Map<String, Value>, negotiated: &mut bool, status: Phase) -> Value {
        if let Some(k) = req
            .keys()
            .find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id"))
        {
            return generic(format!("QMP input member '{k}' is unexpected"));
        }
        let cmd = match req.get("execute") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return generic("QMP input member 'execute' must be a string"),
            None => return generic("QMP input lacks member 'execute'"),
        };
        let empty = Map::new();
        let args = match req.get("arguments") {
            None => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => return generic("QMP input member 'arguments' must be an object"),
        };
        if !*negotiated && cmd != "qmp_capabilities" {
            return error(
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
        }
        let no_args = |f: &dyn Fn() -> Value| match args.keys().next() {
            Some(k) => generic(format!("Parameter '{k}' is unexpected")),
            None => f(),
        };
        match cmd {
            "qmp_capabilities" if *negotiated => error(
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored",
            ),
            "qmp_capabilities" => match args.get("enable").and_then(Value::as_array) {
                Some(caps) if !caps.is_empty() => generic(format!(
                    "Capability '{}' not available",
                    caps[0].as_str().unwrap_or("?")
                )),
                _ => {
                    *negotiated = true;
                    ok()
                }
            },
            "query-migrate" => no_args(&|| self.query_migrate(status)),
            "query-migrate-parameters" => no_args(&|| {
                let p = self.control.progress();
                json!({"return": {
                    "downtime-limit": p.downtime_limit.as_millis() as u64,
                    "max-bandwidth": p.max_bandwidth,
                }})
            }),
            "migrate-set-parameters" => self.set_parameters(args),
            "migrate_cancel" => no_args(&|| match self.control.cancel() {
                Ok(()) => {
                    (self.on_cancel)();
                    ok()
                }
                Err(e) => generic(e.to_string()),
            }),
            "migrate-start-postcopy" => no_args(&|| {
                if self.end == End::Destination {
                    return generic("migrate-start-postcopy is for the source of the migration");
                }
                match self.control.start_postcopy() {
                    Ok(()) => ok(),
                    Err(e) => generic(e.to_string()),
                }
            }),
            "migrate" => self.migrate_resume(args, status),
            "query-commands" => no_args(&|| {
                let names = [
                    "qmp_capabilities",
                    "query-commands",
                    "query-migrate",
                    "query-migrate-parameters",
                    "migrate-set-parameters",
                    "migrate_cancel",
                    "migrate-start-postcopy",
                    "migrate",
                ];
                json!({"return": names.map(|n| json!({"name": n}))})
            }),
            other => error(
                "CommandNotFound",
                format!("The command {other} has not been found"),
            ),
        }
    }

    /// `migrate` with `resume: true` and a `tcp:HOST:PORT` (or `unix:PATH`) URI, as QEMU's
    /// post-copy recovery: the next reconnection goes to that address. Anything else is
    /// refused: the migration this socket drives is already running.
    fn migrate_resume(&self, args: &Map<String, Value>, status: Phase) -> Value {
        if self.end == End::Destination {
            return generic("migrate is for the source of the migration");
        }
        if let Some(k) = args
            .keys()
            .find(|k| !matches!(k.as_str(), "uri" | "resume"))
        {
            return generic(format!("Parameter '{k}' is unexpected"));
        }
        if args.get("resume") != Some(&Value::Bool(true)) {
            return generic(
                "a migration is already running; only migrate with resume=true (a post-copy \
                 recovery to a new address) is accepted",
            );
        }
        let Some(uri) = args.get("uri").and_then(Value::as_str) else {
            return generic("Parameter 'uri' is missing");
        };
        let target = match uri.split_once(':') {
            Some(("tcp", t)) | Some(("unix", t)) if !t.is_empty() => t,
            _ => return generic(format!("URI '{uri}' is not tcp:HOST:PORT or unix:PATH")),
        };
        if !matches!(
            status,
            Phase::PostcopyActive | Phase::PostcopyPaused | Phase::PostcopyRecover
        ) {
            return generic(format!(
                "migrate with resume=true is for a migration in post-copy, not '{}'",
                status.name()
            ));
        }
        self.control.recover_to(target);
        ok()
    }

    fn query_migrate(&self, status: Phase) -> Value {
        let p = self.control.progress();
        let page = self.page_size.max(1);
        let mut r = json!({
            "status": status.name(),
            "total-time": p.elapsed.as_millis() as u64,
            "expected-downtime": p.expected_downtime.as_millis() as u64,
            "x-postcopy-recoveries": p.recoveries,
            "ram": {
                "transferred": p.transferred_bytes,
                "remaining": p.remaining_bytes,
                "total": p.total_bytes,
                "duplicate": p.zero_pages,
                "normal": p.transferred_bytes / page,
                "normal-bytes": p.transferred_bytes,
                "dirty-pages-rate": p.dirty_bytes_per_sec / page,
                "mbps": p.bandwidth_bytes_per_sec as f64 * 8.0 / 1e6,
                "page-size": page,
                "dirty-sync-count": p.round,
            },
        });
        if p.throttle_percent > 0 {
            r["cpu-throttle-percentage"] = json!(p.throttle_percent);
        }
        json!({ "return": r })
    }

    /// `migrate-set-parameters`: all checked before any is applied.
    fn set_parameters(&self, args: &Map<String, Value>) -> Value {
        if self.end == End::Destination {
            return generic("migration parameters are set on the source of the migration");
        }
        let (mut downtime, mut bandwidth) = (None, None);
        for (k, v) in args {
            let n = v.as_u64();
            match (k.as_str(), n) {
                ("downtime-limit", Some(0)) => {
                    return generic("Parameter 'downtime-limit' must be at least 1 ms")
                }
                ("downtime-limit", Some(ms)) if ms <= MAX_DOWNTIME_MS => downtime = Some(ms),
                ("downtime-limit", _) => {
                    return generic(
                        "Parameter 'downtime-limit' expects an integer in the range of 1 to 2000000 ms",
                    )
                }
                ("max-bandwidth", Some(b)) => bandwidth = Some(b),
                ("max-bandwidth", None) => {
                    return generic("Parameter 'max-bandwidth' expects an integer (bytes/s)")
                }
                (other, _) => {
                    return generic(format!(
                        "Parameter '{other}' is not supported here (downtime-limit and max-bandwidth are)"
                    ))
                }
            }
        }
        if let Some(ms) = downtime {
            if let Err(e) = self.control.set_downtime_limit(Duration::from_millis(ms)) {
                return generic(e.to_string());
            }
        }
        if let Some(b) = bandwidth {
            // QMP has no "none": 0 lifts the cap.
            if let Err(e) = self.control.set_max_bandwidth((b > 0).then_some(b)) {
                return generic(e.to_string());
            }
        }
        ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn commands(end: End) -> (Commands, Arc<AtomicU32>) {
        let cancels = Arc::new(AtomicU32::new(0));
        let c = cancels.clone();
        let commands = Commands {
            control: MigrationControl::new(),
            end,
            page_size: 4096,
            on_cancel: Box::new(move || {
                c.fetch_add(1, Ordering::Relaxed);
            }),
        };
        (commands, cancels)
    }

    fn call(c: &Commands, negotiated: &mut bool, line: &str) -> Value {
        c.handle(line.as_bytes(), negotiated, Phase::Active)
    }

    fn class(v: &Value) -> &str {
        v["error"]["class"].as_str().unwrap_or("")
    }

    #[test]
    fn migrate_resume_points_a_post_copy_recovery_at_a_new_address() {
        let (c, _) = commands(End::Source);
        let mut n = true;
        let line =
            r#"{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444", "resume": true}}"#;
        for status in [Phase::PostcopyActive, Phase::PostcopyPaused] {
            assert_eq!(
                c.handle(line.as_bytes(), &mut n, status),
                json!({"return": {}})
            );
        }
        let (d, _) = commands(End::Destination);
        let r = d.handle(line.as_bytes(), &mut n, Phase::PostcopyPaused);
        assert_eq!(class(&r), "GenericError", "{r}");
    }

    #[test]
    fn negotiation_comes_first_and_ids_are_echoed() {
        let (c, _) = commands(End::Source);
        let mut n = false;
        let r = call(&c, &mut n, r#"{"execute": "query-migrate", "id": 1}"#);
        assert_eq!(class(&r), "CommandNotFound");
        assert_eq!(r["id"], 1);
        let r = call(&c, &mut n, r#"{"execute": "qmp_capabilities", "id": "a"}"#);
        assert_eq!(r, json!({"return": {}, "id": "a"}));
        assert!(n);
        let r = call(&c, &mut n, r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(class(&r), "CommandNotFound");
        let r = call(&c, &mut n, r#"{"execute": "query-migrate", "id": [2]}"#);
        assert_eq!(r["id"], json!([2]));
        assert_eq!(r["return"]["status"], "active");
        assert_eq!(r["return"]["ram"]["page-size"], 4096);
        let r = call(&c, &mut n, r#"{"execute": "no-such-thing"}"#);
        assert_eq!(class(&r), "CommandNotFound");
        assert!(greeting()["QMP"]["version"]["qemu"]["minor"].is_u64());
        assert_eq!(event(Phase::Completed)["data"]["status"], "completed");
    }

    #[test]
    fn malformed_requests_and_refused_parameters_are_generic_errors() {
        let (c, _) = commands(End::Source);
        let mut n = true;
        for line in [
            "{",
            "42",
            r#"{"arguments": {}}"#,
            r#"{"execute": null}"#,
            r#"{"execute": "query-migrate", "arguments": 1}"#,
            r#"{"execute": "query-migrate", "extra": 1}"#,
            r#"{"execute": "query-migrate", "arguments": {"x": 1}}"#,
            r#"{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 0}}"#,
            r#"{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 2000001}}"#,
            r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1.5}}"#,
            r#"{"execute": "migrate-set-parameters", "arguments": {"xbzrle-cache-size": 1}}"#,
            r#"{"execute": "migrate-start-postcopy"}"#,
            r#"{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1"}}"#,
            r#"{"execute": "migrate", "arguments": {"uri": "rdma:x", "resume": true}}"#,
            r#"{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1", "resume": true}}"#,
        ] {
            let r = call(&c, &mut n, line);
            assert_eq!(class(&r), "GenericError", "{line} -> {r}");
        }
        let ok = json!({"return": {}});
        let set = r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 0, "downtime-limit": 50}}"#;
        assert_eq!(call(&c, &mut n, set), ok);
        let set =
            r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1048576}}"#;
        assert_eq!(call(&c, &mut n, set), ok);
    }

    #[test]
    fn cancel_runs_the_hook_and_the_destination_refuses_source_commands() {
        let (c, cancels) = commands(End::Destination);
        let mut n = true;
        let r = call(&c, &mut n, r#"{"execute": "migrate_cancel"}"#);
        assert_eq!(r, json!({"return": {}}));
        assert!(c.control.is_cancelled());
        assert_eq!(cancels.load(Ordering::Relaxed), 1);
        for line in [
            r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1}}"#,
            r#"{"execute": "migrate-start-postcopy"}"#,
        ] {
            let r = call(&c, &mut n, line);
            assert_eq!(class(&r), "GenericError", "{line} -> {r}");
        }
    }
}
