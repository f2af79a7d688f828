//! Conversation state and request validation, shared by both transports.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum CallKind {
    Custom,
    Function,
}

impl CallKind {
    fn call_words(self) -> &'static str {
        match self {
            CallKind::Custom => "custom tool call",
            CallKind::Function => "function call",
        }
    }
}

/// What a response id stands for: enough to validate the next request chained to it.
#[derive(Debug, Clone)]
pub(super) struct Conversation {
    pub(super) response_id: String,
    /// Every tool call of the chain so far.
    pub(super) calls: HashSet<(CallKind, String)>,
    /// Tool calls of this response that the next request must answer.
    pub(super) pending: Vec<(CallKind, String)>,
    /// Tokens of the whole chain (what a cache hit saves).
    pub(super) context_tokens: u64,
}

/// A refusal, with the `previous_response_id` the refused request referenced (for eviction).
pub(super) type Refused = Box<(ApiError, Option<String>)>;

/// A request that passed validation.
#[derive(Debug)]
pub(super) struct Accepted {
    pub(super) body: Value,
    pub(super) previous: Option<Conversation>,
    /// Whether the previous response came from this connection's cache.
    pub(super) cache_hit: bool,
    pub(super) calls: HashSet<(CallKind, String)>,
    pub(super) generate: bool,
    pub(super) store: bool,
}

pub(super) fn check_body(body: &Value, transport: Transport) -> Result<(), ApiError> {
    let Some(object) = body.as_object() else {
        return Err(ApiError::invalid(
            Some("invalid_json"),
            "The request must be a JSON object.",
            None,
        ));
    };
    if transport == Transport::WebSocket {
        match object.get("type").and_then(Value::as_str) {
            Some("response.create") => {}
            Some(other) => {
                return Err(ApiError::invalid(
                    Some("invalid_value"),
                    format!("Invalid value: '{other}'. Supported values are: 'response.create'."),
                    Some("type"),
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    Some("missing_required_parameter"),
                    "Missing required parameter: 'type'.",
                    Some("type"),
                ));
            }
        }
    }
    for key in object.keys() {
        let known = CREATE_FIELDS.contains(&key.as_str())
            || match transport {
                Transport::WebSocket => WS_ONLY_FIELDS.contains(&key.as_str()),
                Transport::Http => HTTP_ONLY_FIELDS.contains(&key.as_str()),
            };
        if !known {
            return Err(ApiError::invalid(
                Some("unknown_parameter"),
                format!("Unknown parameter: '{key}'."),
                Some(key),
            ));
        }
    }
    if !object.get("model").is_some_and(Value::is_string) {
        return Err(ApiError::invalid(
            Some("missing_required_parameter"),
            "Missing required parameter: 'model'.",
            Some("model"),
        ));
    }
    match object.get("input") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let typed = item.get("type").is_some_and(Value::is_string);
                let role = item.get("role").is_some_and(Value::is_string);
                if !typed && !role {
                    return Err(ApiError::invalid(
                        Some("invalid_value"),
                        format!(
                            "Invalid input item at index {i}: expected an object with 'type' or 'role'."
                        ),
                        Some(&format!("input[{i}]")),
                    ));
                }
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("invalid_type"),
                "Invalid type for 'input': expected a string or an array of input items.",
                Some("input"),
            ));
        }
    }
    if let Some(id) = object.get("previous_response_id")
        && !(id.is_string() || id.is_null())
    {
        return Err(ApiError::invalid(
            Some("invalid_type"),
            "Invalid type for 'previous_response_id': expected a string.",
            Some("previous_response_id"),
        ));
    }
    Ok(())
}

/// Tool-call pairing as the real service checks it: every call of the previous response needs
/// an output in this input, every output needs a call of the same kind, and calls replayed in
/// the input need their outputs too.
pub(super) fn check_tool_outputs(
    previous: Option<&Conversation>,
    input: &[Value],
) -> Result<HashSet<(CallKind, String)>, ApiError> {
    let call_id = |item: &Value| {
        item.get("call_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let mut calls = previous.map(|c| c.calls.clone()).unwrap_or_default();
    let mut required: Vec<(CallKind, String)> =
        previous.map(|c| c.pending.clone()).unwrap_or_default();
    for item in input {
        let kind = match item.get("type").and_then(Value::as_str) {
            Some("custom_tool_call") => CallKind::Custom,
            Some("function_call") => CallKind::Function,
            _ => continue,
        };
        if let Some(id) = call_id(item) {
            calls.insert((kind, id.clone()));
            required.push((kind, id));
        }
    }
    let mut answered = HashSet::new();
    for item in input {
        let kind = match item.get("type").and_then(Value::as_str) {
            Some("custom_tool_call_output") => CallKind::Custom,
            Some("function_call_output") => CallKind::Function,
            _ => continue,
        };
        let Some(id) = call_id(item) else {
            return Err(ApiError::invalid(
                Some("missing_required_parameter"),
                "Missing required parameter: 'input[].call_id'.",
                Some("input"),
            ));
        };
        if !calls.contains(&(kind, id.clone())) {
            return Err(ApiError::invalid(
                Some("tool_call_missing"),
                format!(
                    "No tool call found for {} output with call_id {id}.",
                    kind.call_words()
                ),
                Some("input"),
            ));
        }
        answered.insert((kind, id));
    }
    for pair in &required {
        if !answered.contains(pair) {
            return Err(ApiError::invalid(
                Some("tool_output_missing"),
                format!(
                    "No tool output found for {} {}.",
                    pair.0.call_words(),
                    pair.1
                ),
                Some("input"),
            ));
        }
    }
    Ok(calls)
}

/// Validate a parsed request body. `cache` is the connection-local cache (WebSocket only).
pub(super) fn accept_request(
    shared: &Shared,
    transport: Transport,
    body: Value,
    cache: Option<&Conversation>,
) -> Result<Accepted, Refused> {
    check_body(&body, transport).map_err(|e| Box::new((e, None)))?;
    let previous_id = body
        .get("previous_response_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let (previous, cache_hit) = match &previous_id {
        None => (None, false),
        Some(id) => match cache.filter(|c| &c.response_id == id) {
            Some(hit) => (Some(hit.clone()), true),
            // Only `store: true` responses have a persisted fallback (the guide).
            None => match shared.stored(id) {
                Some(stored) => (Some(stored), false),
                None => return Err(Box::new((ApiError::previous_not_found(id), None))),
            },
        },
    };
    let input = body
        .get("input")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let calls = check_tool_outputs(previous.as_ref(), input)
        .map_err(|e| Box::new((e, previous_id.clone())))?;
    let generate = body.get("generate") != Some(&Value::Bool(false));
    // `store` defaults to true in the Responses API.
    let store = body.get("store").and_then(Value::as_bool).unwrap_or(true);
    Ok(Accepted {
        body,
        previous,
        cache_hit,
        calls,
        generate,
        store,
    })
}
