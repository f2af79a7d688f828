//! Event planning, shared by both transports: what a turn streams, event by event.

use super::*;

/// What happens to state once a response's last event is out.
#[derive(Debug, Clone)]
pub(super) enum Commit {
    /// Completed or incomplete: becomes the connection's cached response (and stored if asked).
    Keep {
        conversation: Conversation,
        store: bool,
    },
    /// Failed turn: the referenced `previous_response_id` is evicted from the connection cache.
    Evict { previous_id: Option<String> },
}

#[derive(Debug)]
pub(super) struct Plan {
    pub(super) gate: Option<Gate>,
    pub(super) hold_before: Option<(String, Gate)>,
    /// Events with their offsets from the request's arrival.
    pub(super) events: Vec<(Duration, Value)>,
    /// Set for [`Outcome::Error`] turns: no events, just this error after `ttft`.
    pub(super) error: Option<(Duration, ApiError)>,
    pub(super) drop_after: Option<usize>,
    pub(super) commit: Commit,
}

fn approx_tokens(chars: usize) -> u64 {
    chars.div_ceil(DEFAULT_DELTA_CHARS) as u64
}

/// Split `text` into pieces of `chars` characters (on char boundaries).
pub(super) fn split_tokens(text: &str, chars: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (count, (i, _)) in text.char_indices().enumerate() {
        if count > 0 && count % chars == 0 {
            pieces.push(&text[start..i]);
            start = i;
        }
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

struct PlanWriter {
    pub(super) events: Vec<(Duration, Value)>,
    clock: Duration,
    sequence: u64,
}

impl PlanWriter {
    fn emit(&mut self, mut event: Value) {
        if let Some(object) = event.as_object_mut() {
            object.insert("sequence_number".to_owned(), json!(self.sequence));
        }
        self.sequence += 1;
        self.events.push((self.clock, event));
    }
}

/// The request fields a response object echoes.
struct Echo<'a> {
    pub(super) id: &'a str,
    created_at: u64,
    pub(super) body: &'a Value,
}

impl Echo<'_> {
    pub(super) fn response(
        &self,
        status: &str,
        output: &[Value],
        usage: Value,
        extra: &[(&str, Value)],
    ) -> Value {
        let field = |name: &str, default: Value| self.body.get(name).cloned().unwrap_or(default);
        let mut object = Map::new();
        object.insert("id".into(), json!(self.id));
        object.insert("object".into(), json!("response"));
        object.insert("created_at".into(), json!(self.created_at));
        object.insert("status".into(), json!(status));
        object.insert("background".into(), json!(false));
        object.insert("error".into(), Value::Null);
        object.insert("incomplete_details".into(), Value::Null);
        object.insert("instructions".into(), field("instructions", Value::Null));
        object.insert(
            "max_output_tokens".into(),
            field("max_output_tokens", Value::Null),
        );
        object.insert("model".into(), field("model", Value::Null));
        object.insert("output".into(), Value::Array(output.to_vec()));
        object.insert(
            "parallel_tool_calls".into(),
            field("parallel_tool_calls", json!(true)),
        );
        object.insert(
            "previous_response_id".into(),
            field("previous_response_id", Value::Null),
        );
        object.insert(
            "reasoning".into(),
            field("reasoning", json!({"effort": null, "summary": null})),
        );
        object.insert("store".into(), field("store", json!(true)));
        object.insert("temperature".into(), field("temperature", json!(1.0)));
        object.insert(
            "text".into(),
            field("text", json!({"format": {"type": "text"}})),
        );
        object.insert("tool_choice".into(), field("tool_choice", json!("auto")));
        object.insert("tools".into(), field("tools", json!([])));
        object.insert("top_p".into(), field("top_p", json!(1.0)));
        object.insert("truncation".into(), field("truncation", json!("disabled")));
        object.insert("usage".into(), usage);
        object.insert("user".into(), Value::Null);
        object.insert("metadata".into(), field("metadata", json!({})));
        for (key, value) in extra {
            object.insert((*key).to_owned(), value.clone());
        }
        Value::Object(object)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Plan the whole event sequence of one accepted request.
pub(super) fn plan_turn(
    shared: &Shared,
    accepted: &Accepted,
    turn: &Turn,
    response_id: &str,
) -> Plan {
    let previous_id = accepted.previous.as_ref().map(|p| p.response_id.clone());
    if let Outcome::Error {
        status,
        code,
        message,
    } = &turn.outcome
    {
        return Plan {
            gate: turn.gate.clone(),
            hold_before: None,
            events: Vec::new(),
            error: Some((turn.ttft, ApiError::scripted(*status, code, message))),
            drop_after: None,
            commit: Commit::Evict { previous_id },
        };
    }
    let echo = Echo {
        id: response_id,
        created_at: unix_now(),
        body: &accepted.body,
    };
    let previous_tokens = accepted.previous.as_ref().map_or(0, |p| p.context_tokens);
    let request_tokens = {
        let part = |name: &str| accepted.body.get(name).map_or(0, |v| v.to_string().len());
        approx_tokens(part("input") + part("instructions") + part("tools"))
    };
    let input_tokens = previous_tokens + request_tokens;
    let cached_tokens = if accepted.cache_hit {
        previous_tokens
    } else {
        0
    };
    let usage = |output_tokens: u64| {
        json!({
            "input_tokens": input_tokens,
            "input_tokens_details": { "cached_tokens": cached_tokens },
            "output_tokens": output_tokens,
            "output_tokens_details": { "reasoning_tokens": 0 },
            "total_tokens": input_tokens + output_tokens,
        })
    };

    let mut w = PlanWriter {
        events: Vec::new(),
        clock: Duration::ZERO,
        sequence: 0,
    };
    let in_progress = echo.response("in_progress", &[], Value::Null, &[]);
    w.emit(json!({ "type": "response.created", "response": in_progress }));

    if !accepted.generate {
        // Prewarm: a response id and no output (the guide: "generate: false … no model output").
        let completed = echo.response("completed", &[], usage(0), &[]);
        w.emit(json!({ "type": "response.completed", "response": completed }));
        return Plan {
            gate: None,
            hold_before: None,
            events: w.events,
            error: None,
            drop_after: None,
            commit: Commit::Keep {
                conversation: Conversation {
                    response_id: response_id.to_owned(),
                    calls: accepted.calls.clone(),
                    pending: Vec::new(),
                    context_tokens: input_tokens,
                },
                store: accepted.store,
            },
        };
    }
    w.emit(json!({ "type": "response.in_progress", "response": in_progress }));

    let (items, incomplete) = match &turn.outcome {
        Outcome::Complete(items) | Outcome::Failed { items, .. } => (items.as_slice(), false),
        Outcome::Incomplete { items, .. } => (items.as_slice(), true),
        Outcome::Error { .. } => (&[][..], false),
    };
    let token_time = |k: u64| match turn.tokens_per_sec {
        Some(rate) => turn.ttft + Duration::from_secs_f64(k as f64 / rate),
        None => turn.ttft,
    };
    let mut token = 0u64;
    let mut output = Vec::new();
    let mut calls = accepted.calls.clone();
    let mut pending = Vec::new();
    w.clock = turn.ttft;
    for (index, item) in items.iter().enumerate() {
        let last = index + 1 == items.len();
        let done_status = if incomplete && last {
            "incomplete"
        } else {
            "completed"
        };
        let done_item = match item {
            Item::Message(text) => {
                let id = shared.next_id("msg");
                w.emit(json!({
                    "type": "response.output_item.added", "output_index": index,
                    "item": { "id": id, "type": "message", "status": "in_progress", "content": [], "role": "assistant" },
                }));
                w.emit(json!({
                    "type": "response.content_part.added", "item_id": id, "output_index": index, "content_index": 0,
                    "part": { "type": "output_text", "annotations": [], "logprobs": [], "text": "" },
                }));
                for piece in split_tokens(text, turn.delta_chars) {
                    w.clock = token_time(token);
                    token += 1;
                    w.emit(json!({
                        "type": "response.output_text.delta", "item_id": id, "output_index": index,
                        "content_index": 0, "delta": piece, "logprobs": [],
                    }));
                }
                w.emit(json!({
                    "type": "response.output_text.done", "item_id": id, "output_index": index,
                    "content_index": 0, "text": text, "logprobs": [],
                }));
                let part = json!({ "type": "output_text", "annotations": [], "logprobs": [], "text": text });
                w.emit(json!({
                    "type": "response.content_part.done", "item_id": id, "output_index": index,
                    "content_index": 0, "part": part,
                }));
                json!({ "id": id, "type": "message", "status": done_status, "content": [part], "role": "assistant" })
            }
            Item::CustomToolCall { name, input } => {
                let id = shared.next_id("ctc");
                let call_id = shared.next_id("call");
                w.emit(json!({
                    "type": "response.output_item.added", "output_index": index,
                    "item": { "id": id, "type": "custom_tool_call", "call_id": call_id, "name": name, "input": "" },
                }));
                for piece in split_tokens(input, turn.delta_chars) {
                    w.clock = token_time(token);
                    token += 1;
                    w.emit(json!({
                        "type": "response.custom_tool_call_input.delta", "item_id": id,
                        "output_index": index, "delta": piece,
                    }));
                }
                w.emit(json!({
                    "type": "response.custom_tool_call_input.done", "item_id": id,
                    "output_index": index, "input": input,
                }));
                calls.insert((CallKind::Custom, call_id.clone()));
                pending.push((CallKind::Custom, call_id.clone()));
                json!({ "id": id, "type": "custom_tool_call", "call_id": call_id, "name": name, "input": input })
            }
            Item::FunctionCall {
                name,
                arguments,
                namespace,
            } => {
                let id = shared.next_id("fc");
                let call_id = shared.next_id("call");
                let mut added = json!({ "id": id, "type": "function_call", "status": "in_progress",
                                        "arguments": "", "call_id": call_id, "name": name });
                if let Some(ns) = namespace {
                    added["namespace"] = json!(ns);
                }
                w.emit(json!({
                    "type": "response.output_item.added", "output_index": index, "item": added,
                }));
                for piece in split_tokens(arguments, turn.delta_chars) {
                    w.clock = token_time(token);
                    token += 1;
                    w.emit(json!({
                        "type": "response.function_call_arguments.delta", "item_id": id,
                        "output_index": index, "delta": piece,
                    }));
                }
                w.emit(json!({
                    "type": "response.function_call_arguments.done", "item_id": id, "name": name,
                    "output_index": index, "arguments": arguments,
                }));
                calls.insert((CallKind::Function, call_id.clone()));
                pending.push((CallKind::Function, call_id.clone()));
                let mut done = json!({ "id": id, "type": "function_call", "status": done_status,
                                       "arguments": arguments, "call_id": call_id, "name": name });
                if let Some(ns) = namespace {
                    done["namespace"] = json!(ns);
                }
                done
            }
        };
        w.emit(json!({ "type": "response.output_item.done", "output_index": index, "item": done_item }));
        output.push(done_item);
    }

    let output_tokens = token;
    let commit_keep = |store: bool| Commit::Keep {
        conversation: Conversation {
            response_id: response_id.to_owned(),
            calls: calls.clone(),
            pending: pending.clone(),
            context_tokens: input_tokens + output_tokens,
        },
        store,
    };
    let commit = match &turn.outcome {
        Outcome::Complete(_) => {
            let response = echo.response("completed", &output, usage(output_tokens), &[]);
            w.emit(json!({ "type": "response.completed", "response": response }));
            commit_keep(accepted.store)
        }
        Outcome::Incomplete { reason, .. } => {
            let details = json!({ "reason": reason });
            let response = echo.response(
                "incomplete",
                &output,
                usage(output_tokens),
                &[("incomplete_details", details)],
            );
            w.emit(json!({ "type": "response.incomplete", "response": response }));
            commit_keep(accepted.store)
        }
        Outcome::Failed { code, message, .. } => {
            let error = json!({ "code": code, "message": message });
            let response = echo.response("failed", &output, Value::Null, &[("error", error)]);
            w.emit(json!({ "type": "response.failed", "response": response }));
            Commit::Evict { previous_id }
        }
        Outcome::Error { .. } => Commit::Evict { previous_id },
    };
    Plan {
        gate: turn.gate.clone(),
        hold_before: turn.hold_before.clone(),
        events: w.events,
        error: None,
        drop_after: turn.drop_after,
        commit,
    }
}

/// Validate, take a turn and plan it. `Err` is an immediate refusal (with the previous id the
/// refused request referenced, for eviction).
pub(super) fn start_request(
    shared: &Shared,
    transport: Transport,
    body: Value,
    cache: Option<&Conversation>,
) -> Result<(String, Plan, bool), Refused> {
    let accepted = accept_request(shared, transport, body, cache)?;
    // Prewarm consumes no scripted turn.
    let turn = if accepted.generate {
        shared.take_turn(&accepted.body)
    } else {
        Turn::text("")
    };
    let response_id = shared.next_id("resp");
    let plan = plan_turn(shared, &accepted, &turn, &response_id);
    Ok((response_id, plan, accepted.generate))
}
