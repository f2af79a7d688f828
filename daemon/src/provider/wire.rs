//! Wire shapes of the Responses API: the `response.create` request (WebSocket mode) or body
//! (HTTP + SSE), its input items and tools, and the server events parsed into [`ServerEvent`].
//!
//! Serialization is byte-stable: structs serialize in declaration order and nothing here uses
//! a hash map, so the same inputs give the same bytes. That matters because `instructions` and
//! `tools` are resent with every request (they are not inherited through
//! `previous_response_id`) and stable bytes keep the provider's prompt cache warm.
//!
//! Parsing is tolerant: unknown events become [`ServerEvent::Other`], unknown output items
//! [`OutputItem::Other`], and missing optional fields take defaults.

use serde::{Deserialize, Serialize};

/// The Lark grammar of the `apply_patch` freeform tool, as Codex ships it
/// (`codex-rs/core/src/tools/handlers/tool_apply_patch.lark`): the format Codex models are
/// trained to emit.
pub(crate) const APPLY_PATCH_LARK_GRAMMAR: &str = r#"start: begin_patch hunk+ end_patch
begin_patch: "*** Begin Patch" LF
end_patch: "*** End Patch" LF?

hunk: add_hunk | delete_hunk | update_hunk
add_hunk: "*** Add File: " filename LF add_line+
delete_hunk: "*** Delete File: " filename LF
update_hunk: "*** Update File: " filename LF change_move? change?

filename: /(.+)/
add_line: "+" /(.*)/ LF -> line

change_move: "*** Move to: " filename LF
change: (change_context | change_line)+ eof_line?
change_context: ("@@" | "@@ " /(.+)/) LF
change_line: ("+" | "-" | " ") /(.*)/ LF
eof_line: "*** End of File" LF

%import common.LF
"#;

/// Name of the edit tool; the ask pipeline matches tool calls on it.
pub(crate) const APPLY_PATCH_TOOL: &str = "apply_patch";

/// True for the freeform tool and for a gateway's function-tool bridge of it alike.
const APPLY_PATCH_DESCRIPTION: &str = "Use the `apply_patch` tool to edit files. Its input is \
the patch text itself, from `*** Begin Patch` to `*** End Patch`; where the tool takes JSON \
arguments, the patch is its one string argument.";

/// Who speaks in an input message.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Role {
    User,
    Developer,
    Assistant,
}

/// One part of an input message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ContentPart {
    /// Text written by the user or the daemon.
    InputText { text: String },
    /// Text the model wrote earlier, replayed in an unchained request.
    OutputText { text: String },
}

/// One item of a request's `input`.
///
/// The call variants replay the model's own earlier tool calls when a conversation is resent
/// unchained (see [`OutputItem::to_input`]); a `*_output` must follow its call.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum InputItem {
    /// A message: `{"type":"message","role":"user","content":[{"type":"input_text",..}]}`.
    Message {
        role: Role,
        content: Vec<ContentPart>,
    },
    /// The model's freeform tool call (replay), answered by [`InputItem::CustomToolCallOutput`].
    CustomToolCall {
        call_id: String,
        name: String,
        input: String,
    },
    /// The answer to a custom (freeform) tool call with the same `call_id`.
    CustomToolCallOutput { call_id: String, output: String },
    /// The model's JSON function call (replay), answered by [`InputItem::FunctionCallOutput`].
    FunctionCall {
        call_id: String,
        name: String,
        arguments: String,
    },
    /// The answer to a function call with the same `call_id`.
    FunctionCallOutput { call_id: String, output: String },
}

impl InputItem {
    /// A user message with one text part.
    pub(crate) fn user_text(text: impl Into<String>) -> InputItem {
        InputItem::Message {
            role: Role::User,
            content: vec![ContentPart::InputText { text: text.into() }],
        }
    }

    /// A developer message with one text part (repo context, file diffs).
    pub(crate) fn developer_text(text: impl Into<String>) -> InputItem {
        InputItem::Message {
            role: Role::Developer,
            content: vec![ContentPart::InputText { text: text.into() }],
        }
    }

    /// The `call_id` of a call or call output, `None` for messages.
    pub(crate) fn call_id(&self) -> Option<&str> {
        match self {
            InputItem::Message { .. } => None,
            InputItem::CustomToolCall { call_id, .. }
            | InputItem::CustomToolCallOutput { call_id, .. }
            | InputItem::FunctionCall { call_id, .. }
            | InputItem::FunctionCallOutput { call_id, .. } => Some(call_id),
        }
    }

    /// Whether this item is a model tool call (as opposed to its output).
    pub(crate) fn is_call(&self) -> bool {
        matches!(
            self,
            InputItem::CustomToolCall { .. } | InputItem::FunctionCall { .. }
        )
    }

    /// Whether this item answers a tool call.
    pub(crate) fn is_call_output(&self) -> bool {
        matches!(
            self,
            InputItem::CustomToolCallOutput { .. } | InputItem::FunctionCallOutput { .. }
        )
    }
}

/// How a custom tool's free-form input is constrained.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ToolFormat {
    /// Constrained sampling with a grammar (`syntax`: `lark` or `regex`).
    Grammar { syntax: String, definition: String },
    /// Unconstrained text.
    Text,
}

/// A tool offered to the model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Tool {
    /// A freeform tool: the model writes raw text (e.g. a patch) instead of JSON.
    Custom {
        name: String,
        description: String,
        format: ToolFormat,
    },
    /// A JSON function tool; `parameters` is a JSON Schema.
    Function {
        name: String,
        description: String,
        parameters: serde_json::Value,
        strict: bool,
    },
}

impl Tool {
    /// The `apply_patch` freeform tool with Codex's Lark grammar.
    pub(crate) fn apply_patch() -> Tool {
        Tool::Custom {
            name: APPLY_PATCH_TOOL.to_owned(),
            description: APPLY_PATCH_DESCRIPTION.to_owned(),
            format: ToolFormat::Grammar {
                syntax: "lark".to_owned(),
                definition: APPLY_PATCH_LARK_GRAMMAR.to_owned(),
            },
        }
    }

    pub(crate) fn name(&self) -> &str {
        match self {
            Tool::Custom { name, .. } | Tool::Function { name, .. } => name,
        }
    }
}

/// `tool_choice` of a request.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ToolChoice {
    Auto,
    Required,
    None,
}

/// Which transport a request is framed for: the two differ only in a few fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// A WebSocket message: `"type":"response.create"`, no `stream`.
    WebSocket,
    /// An HTTP body for `POST /v1/responses`: `"stream":true`, no `type`, no `generate`.
    Http,
}

/// A `response.create` request, borrowing everything so that building one copies nothing.
#[derive(Serialize, Debug)]
pub(crate) struct CreateRequest<'a> {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    model: &'a str,
    instructions: &'a str,
    input: Vec<&'a InputItem>,
    tools: &'a [Tool],
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoice>,
    store: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_response_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generate: Option<bool>,
    /// The lane (WebSocket mode with `stream_id` lanes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_id: Option<&'a str>,
}

/// Everything a request is built from; [`RequestParts::encode`] turns it into bytes.
#[derive(Debug)]
pub(crate) struct RequestParts<'a> {
    pub(crate) model: &'a str,
    pub(crate) instructions: &'a str,
    pub(crate) input: Vec<&'a InputItem>,
    pub(crate) tools: &'a [Tool],
    pub(crate) tool_choice: Option<ToolChoice>,
    pub(crate) previous_response_id: Option<&'a str>,
    pub(crate) prompt_cache_key: Option<&'a str>,
    /// `false` for a prewarm (WebSocket mode only: prepares state, generates nothing).
    pub(crate) generate: bool,
    /// The lane the request runs on, when the connection is shared (WebSocket mode only).
    pub(crate) stream_id: Option<&'a str>,
}

impl RequestParts<'_> {
    /// Serialize for `framing`. `store` is always `false`: nothing is kept server-side beyond
    /// the connection-local cache that `previous_response_id` chains from.
    pub(crate) fn encode(self, framing: Framing) -> Result<String, serde_json::Error> {
        let ws = framing == Framing::WebSocket;
        let request = CreateRequest {
            kind: ws.then_some("response.create"),
            model: self.model,
            instructions: self.instructions,
            input: self.input,
            tools: self.tools,
            tool_choice: self.tool_choice,
            store: false,
            stream: (!ws).then_some(true),
            previous_response_id: self.previous_response_id,
            prompt_cache_key: self.prompt_cache_key,
            generate: (ws && !self.generate).then_some(false),
            stream_id: self.stream_id.filter(|_| ws),
        };
        serde_json::to_string(&request)
    }
}

/// Token usage of a finished response.
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    #[serde(default)]
    pub(crate) input_tokens: u64,
    #[serde(default)]
    pub(crate) output_tokens: u64,
    #[serde(default)]
    pub(crate) total_tokens: u64,
    #[serde(default)]
    pub(crate) input_tokens_details: InputTokensDetails,
    #[serde(default)]
    pub(crate) output_tokens_details: OutputTokensDetails,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct InputTokensDetails {
    #[serde(default)]
    pub(crate) cached_tokens: u64,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct OutputTokensDetails {
    #[serde(default)]
    pub(crate) reasoning_tokens: u64,
}

/// One part of an output message.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum OutputContent {
    OutputText {
        #[serde(default)]
        text: String,
    },
    Refusal {
        #[serde(default)]
        refusal: String,
    },
    #[serde(other)]
    Other,
}

/// One item of a response's `output`.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum OutputItem {
    Message {
        #[serde(default)]
        id: String,
        #[serde(default)]
        content: Vec<OutputContent>,
    },
    /// A freeform tool call (`apply_patch`): `input` is the raw patch text.
    CustomToolCall {
        #[serde(default)]
        id: String,
        call_id: String,
        name: String,
        #[serde(default)]
        input: String,
    },
    /// A JSON function call; `arguments` is a JSON string.
    FunctionCall {
        #[serde(default)]
        id: String,
        call_id: String,
        name: String,
        #[serde(default)]
        arguments: String,
    },
    Reasoning {
        #[serde(default)]
        id: String,
    },
    #[serde(other)]
    Other,
}

impl OutputItem {
    /// The text of a message item (output text parts joined), `None` for other items.
    pub(crate) fn text(&self) -> Option<String> {
        match self {
            OutputItem::Message { content, .. } => Some(
                content
                    .iter()
                    .filter_map(|part| match part {
                        OutputContent::OutputText { text } => Some(text.as_str()),
                        OutputContent::Refusal { .. } | OutputContent::Other => None,
                    })
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The item as it must be replayed in an unchained request's input, if it is one the
    /// conversation depends on (messages and tool calls; reasoning is not replayable with
    /// `store:false` unless encrypted, so it is left out).
    pub(crate) fn to_input(&self) -> Option<InputItem> {
        match self {
            OutputItem::Message { .. } => {
                let text = self.text().unwrap_or_default();
                Some(InputItem::Message {
                    role: Role::Assistant,
                    content: vec![ContentPart::OutputText { text }],
                })
            }
            OutputItem::CustomToolCall {
                call_id,
                name,
                input,
                ..
            } => Some(InputItem::CustomToolCall {
                call_id: call_id.clone(),
                name: name.clone(),
                input: input.clone(),
            }),
            OutputItem::FunctionCall {
                call_id,
                name,
                arguments,
                ..
            } => Some(InputItem::FunctionCall {
                call_id: call_id.clone(),
                name: name.clone(),
                arguments: arguments.clone(),
            }),
            OutputItem::Reasoning { .. } | OutputItem::Other => None,
        }
    }
}

/// An error object, as nested in `error` events, failed responses and HTTP error bodies.
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ErrorBody {
    #[serde(default, rename = "type")]
    pub(crate) kind: Option<String>,
    #[serde(default)]
    pub(crate) code: Option<String>,
    #[serde(default)]
    pub(crate) message: Option<String>,
    #[serde(default)]
    pub(crate) param: Option<String>,
}

/// Why a response stopped early (`response.incomplete`).
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct IncompleteDetails {
    #[serde(default)]
    pub(crate) reason: Option<String>,
}

/// The response object carried by `response.created` / `.completed` / `.failed` /
/// `.incomplete` (only the fields the daemon uses).
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ResponseBody {
    #[serde(default)]
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) status: Option<String>,
    #[serde(default)]
    pub(crate) usage: Option<Usage>,
    #[serde(default)]
    pub(crate) output: Vec<OutputItem>,
    #[serde(default)]
    pub(crate) error: Option<ErrorBody>,
    #[serde(default)]
    pub(crate) incomplete_details: Option<IncompleteDetails>,
}

/// Error codes the session acts on.
pub(crate) const PREVIOUS_RESPONSE_NOT_FOUND: &str = "previous_response_not_found";
pub(crate) const CONNECTION_LIMIT_REACHED: &str = "websocket_connection_limit_reached";

/// A server event, reduced to what the daemon uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ServerEvent {
    /// `response.created`: the response id of this turn.
    Created { id: String },
    /// `response.output_item.added`.
    OutputItemAdded { output_index: u32, item: OutputItem },
    /// `response.output_text.delta`.
    OutputTextDelta { item_id: String, delta: String },
    /// `response.custom_tool_call_input.delta`: a piece of the patch as it streams.
    CustomToolCallInputDelta { item_id: String, delta: String },
    /// `response.function_call_arguments.delta`.
    FunctionCallArgumentsDelta { item_id: String, delta: String },
    /// `response.output_item.done`: the finished item.
    OutputItemDone { output_index: u32, item: OutputItem },
    /// `response.completed` (terminal).
    Completed { response: ResponseBody },
    /// `response.failed` (terminal).
    Failed { response: ResponseBody },
    /// `response.incomplete` (terminal, e.g. `max_output_tokens`).
    Incomplete { response: ResponseBody },
    /// `error` (terminal for the request that caused it). WebSocket mode nests the details in
    /// `error` next to an HTTP-like `status`; the SSE reference puts them at the top level.
    Error {
        code: Option<String>,
        message: String,
        status: Option<u16>,
    },
    /// Any other event type, tolerated and ignored.
    Other(String),
}

impl ServerEvent {
    /// The response this event names, when it names one (`response.created` and the
    /// terminal events carrying the response object).
    pub(crate) fn response_id(&self) -> Option<&str> {
        let id = match self {
            ServerEvent::Created { id } => id.as_str(),
            ServerEvent::Completed { response }
            | ServerEvent::Failed { response }
            | ServerEvent::Incomplete { response } => response.id.as_str(),
            ServerEvent::OutputItemAdded { .. }
            | ServerEvent::OutputTextDelta { .. }
            | ServerEvent::CustomToolCallInputDelta { .. }
            | ServerEvent::FunctionCallArgumentsDelta { .. }
            | ServerEvent::OutputItemDone { .. }
            | ServerEvent::Error { .. }
            | ServerEvent::Other(_) => "",
        };
        (!id.is_empty()).then_some(id)
    }

    /// The event's type, for logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ServerEvent::Created { .. } => "response.created",
            ServerEvent::OutputItemAdded { .. } => "response.output_item.added",
            ServerEvent::OutputTextDelta { .. } => "response.output_text.delta",
            ServerEvent::CustomToolCallInputDelta { .. } => "response.custom_tool_call_input.delta",
            ServerEvent::FunctionCallArgumentsDelta { .. } => {
                "response.function_call_arguments.delta"
            }
            ServerEvent::OutputItemDone { .. } => "response.output_item.done",
            ServerEvent::Completed { .. } => "response.completed",
            ServerEvent::Failed { .. } => "response.failed",
            ServerEvent::Incomplete { .. } => "response.incomplete",
            ServerEvent::Error { .. } => "error",
            ServerEvent::Other(_) => "other",
        }
    }

    /// Whether this event ends the response it belongs to.
    pub(crate) fn is_terminal(&self) -> bool {
        matches!(
            self,
            ServerEvent::Completed { .. }
                | ServerEvent::Failed { .. }
                | ServerEvent::Incomplete { .. }
                | ServerEvent::Error { .. }
        )
    }
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum RawEvent {
    #[serde(rename = "response.created")]
    Created { response: ResponseBody },
    #[serde(rename = "response.output_item.added")]
    OutputItemAdded {
        #[serde(default)]
        output_index: u32,
        item: OutputItem,
    },
    #[serde(rename = "response.output_text.delta")]
    OutputTextDelta {
        #[serde(default)]
        item_id: String,
        delta: String,
    },
    #[serde(rename = "response.custom_tool_call_input.delta")]
    CustomToolCallInputDelta {
        #[serde(default)]
        item_id: String,
        delta: String,
    },
    #[serde(rename = "response.function_call_arguments.delta")]
    FunctionCallArgumentsDelta {
        #[serde(default)]
        item_id: String,
        delta: String,
    },
    #[serde(rename = "response.output_item.done")]
    OutputItemDone {
        #[serde(default)]
        output_index: u32,
        item: OutputItem,
    },
    #[serde(rename = "response.completed")]
    Completed { response: ResponseBody },
    #[serde(rename = "response.failed")]
    Failed { response: ResponseBody },
    #[serde(rename = "response.incomplete")]
    Incomplete { response: ResponseBody },
    #[serde(rename = "error")]
    Error {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        status: Option<u16>,
        #[serde(default)]
        error: Option<ErrorBody>,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type", default)]
    kind: String,
}

/// Parse one event (a WebSocket text message or an SSE `data:` payload).
pub(crate) fn parse_event(text: &str) -> Result<ServerEvent, serde_json::Error> {
    Ok(match serde_json::from_str::<RawEvent>(text)? {
        RawEvent::Created { response } => ServerEvent::Created { id: response.id },
        RawEvent::OutputItemAdded { output_index, item } => {
            ServerEvent::OutputItemAdded { output_index, item }
        }
        RawEvent::OutputTextDelta { item_id, delta } => {
            ServerEvent::OutputTextDelta { item_id, delta }
        }
        RawEvent::CustomToolCallInputDelta { item_id, delta } => {
            ServerEvent::CustomToolCallInputDelta { item_id, delta }
        }
        RawEvent::FunctionCallArgumentsDelta { item_id, delta } => {
            ServerEvent::FunctionCallArgumentsDelta { item_id, delta }
        }
        RawEvent::OutputItemDone { output_index, item } => {
            ServerEvent::OutputItemDone { output_index, item }
        }
        RawEvent::Completed { response } => ServerEvent::Completed { response },
        RawEvent::Failed { response } => ServerEvent::Failed { response },
        RawEvent::Incomplete { response } => ServerEvent::Incomplete { response },
        RawEvent::Error {
            code,
            message,
            status,
            error,
        } => {
            let nested = error.unwrap_or_default();
            // An empty field says nothing: fall through to the nested one (the user is shown
            // this message, and an empty one reads as no error at all).
            ServerEvent::Error {
                code: said(code).or(said(nested.code)),
                message: said(message)
                    .or(said(nested.message))
                    .unwrap_or_else(|| "error event without a message".to_owned()),
                status,
            }
        }
        // Only unknown events pay for the second, small parse.
        RawEvent::Other => ServerEvent::Other(serde_json::from_str::<TypeOnly>(text)?.kind),
    })
}

/// A provider's text field, unless it is empty or blank.
fn said(field: Option<String>) -> Option<String> {
    field.filter(|f| !f.trim().is_empty())
}

/// Turn an HTTP error body (`{"error":{..}}`) into the same event a WebSocket would carry.
pub(crate) fn error_from_http(status: u16, body: &[u8]) -> ServerEvent {
    #[derive(Deserialize)]
    struct Envelope {
        error: ErrorBody,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope { error }) => ServerEvent::Error {
            code: said(error.code).or(said(error.kind)),
            message: said(error.message)
                .unwrap_or_else(|| format!("HTTP {status} without a message")),
            status: Some(status),
        },
        Err(_) => ServerEvent::Error {
            code: None,
            message: format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
            ),
            status: Some(status),
        },
    }
}

/// The read-only tools the daemon answers itself, from the repository it watches.
pub(crate) const READ_FILE_TOOL: &str = "read_file";
pub(crate) const SEARCH_TOOL: &str = "search";
pub(crate) const LIST_DIR_TOOL: &str = "list_dir";

impl Tool {
    /// Every tool an `ask` offers: `apply_patch`, then the read-only tools for when the
    /// context sent is not enough (each call costs a round trip, so they are for the gaps).
    pub(crate) fn offered() -> Vec<Tool> {
        let function =
            |name: &str, description: &str, parameters: serde_json::Value| Tool::Function {
                name: name.to_owned(),
                description: description.to_owned(),
                parameters,
                strict: false,
            };
        vec![
            Tool::apply_patch(),
            function(
                READ_FILE_TOOL,
                "Read a file of the repository, whole or a line range (1-based, inclusive). \
                 Only when the file you need was not shown to you.",
                serde_json::json!({
                    "type": "object",
                    "properties": {
                        "path": {"type": "string", "description": "relative to the repository root"},
                        "start_line": {"type": "integer"},
                        "end_line": {"type": "integer"}
                    },
                    "required": ["path"],
                    "additionalProperties": false
                }),
            ),
            function(
                SEARCH_TOOL,
                "Search the repository's files (git-ignored ones excluded) for a literal string, \
                 or a regular expression when regex is true. Returns path:line: text.",
                serde_json::json!({
                    "type": "object",
                    "properties": {
                        "pattern": {"type": "string"},
                        "regex": {"type": "boolean"},
                        "path": {"type": "string", "description": "a directory to search in"}
                    },
                    "required": ["pattern"],
                    "additionalProperties": false
                }),
            ),
            function(
                LIST_DIR_TOOL,
                "List a directory of the repository (git-ignored entries excluded); \
                 directories end with '/'.",
                serde_json::json!({
                    "type": "object",
                    "properties": {
                        "path": {"type": "string", "description": "relative to the repository root; empty for the root"}
                    },
                    "additionalProperties": false
                }),
            ),
        ]
    }

    /// Whether the daemon answers calls to this tool itself (a read-only tool).
    pub(crate) fn is_read_only(name: &str) -> bool {
        [READ_FILE_TOOL, SEARCH_TOOL, LIST_DIR_TOOL].contains(&name)
    }
}

/// A WebSocket-mode event with what lanes need to route it.
#[derive(Debug)]
pub(crate) struct LaneEvent {
    /// The lane it belongs to; `None` for an event about the connection (or from a provider
    /// that does not know lanes).
    pub(crate) stream_id: Option<String>,
    pub(crate) event: ServerEvent,
    /// The provider refused the `stream_id` field itself: it predates lanes.
    pub(crate) refuses_lanes: bool,
}

#[derive(Deserialize)]
struct LaneFields {
    #[serde(default)]
    stream_id: Option<String>,
    #[serde(default)]
    error: Option<LaneErrorFields>,
}

#[derive(Deserialize)]
struct LaneErrorFields {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    param: Option<String>,
}

/// Parse an event of a shared connection (docs/protocol.md, "Provider lanes").
pub(crate) fn parse_lane_event(text: &str) -> Result<LaneEvent, serde_json::Error> {
    let event = parse_event(text)?;
    let fields: LaneFields = serde_json::from_str(text)?;
    let refuses_lanes = fields.stream_id.is_none()
        && fields.error.is_some_and(|e| {
            e.code.as_deref() == Some(UNKNOWN_PARAMETER) && e.param.as_deref() == Some("stream_id")
        });
    Ok(LaneEvent {
        stream_id: fields.stream_id,
        event,
        refuses_lanes,
    })
}

/// The code a provider that predates lanes answers `stream_id` with.
pub(crate) const UNKNOWN_PARAMETER: &str = "unknown_parameter";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parts<'a>(input: Vec<&'a InputItem>, tools: &'a [Tool]) -> RequestParts<'a> {
        RequestParts {
            model: "gpt-5.3-codex-spark",
            instructions: "Be brief.",
            input,
            tools,
            tool_choice: None,
            previous_response_id: Some("resp_1"),
            prompt_cache_key: None,
            generate: true,
            stream_id: None,
        }
    }

    #[test]
    fn input_items_match_golden_json() {
        let cases = [
            (
                InputItem::user_text("hi"),
                r#"{"type":"message","role":"user","content":[{"type":"input_text","text":"hi"}]}"#,
            ),
            (
                InputItem::CustomToolCallOutput {
                    call_id: "call_1".into(),
                    output: "Done!".into(),
                },
                r#"{"type":"custom_tool_call_output","call_id":"call_1","output":"Done!"}"#,
            ),
            (
                InputItem::FunctionCallOutput {
                    call_id: "call_2".into(),
                    output: "{}".into(),
                },
                r#"{"type":"function_call_output","call_id":"call_2","output":"{}"}"#,
            ),
            (
                InputItem::CustomToolCall {
                    call_id: "call_3".into(),
                    name: "apply_patch".into(),
                    input: "*** Begin Patch\n".into(),
                },
                r#"{"type":"custom_tool_call","call_id":"call_3","name":"apply_patch","input":"*** Begin Patch\n"}"#,
            ),
            (
                InputItem::Message {
                    role: Role::Assistant,
                    content: vec![ContentPart::OutputText { text: "ok".into() }],
                },
                r#"{"type":"message","role":"assistant","content":[{"type":"output_text","text":"ok"}]}"#,
            ),
        ];
        for (item, golden) in cases {
            assert_eq!(serde_json::to_string(&item).unwrap(), golden);
            assert_eq!(serde_json::from_str::<InputItem>(golden).unwrap(), item);
        }
    }

    #[test]
    fn apply_patch_tool_is_a_lark_grammar_custom_tool() {
        let value = serde_json::to_value(Tool::apply_patch()).unwrap();
        assert_eq!(value["type"], "custom");
        assert_eq!(value["name"], "apply_patch");
        assert_eq!(value["format"]["type"], "grammar");
        assert_eq!(value["format"]["syntax"], "lark");
        let grammar = value["format"]["definition"].as_str().unwrap();
        assert!(grammar.starts_with("start: begin_patch hunk+ end_patch\n"));
        assert!(grammar.contains(r#"change_line: ("+" | "-" | " ") /(.*)/ LF"#));
        let keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 4, "{keys:?}");
    }

    #[test]
    fn websocket_request_is_byte_stable_and_complete() {
        let tools = [Tool::apply_patch()];
        let msg = InputItem::user_text("rename x");
        let a = parts(vec![&msg], &tools)
            .encode(Framing::WebSocket)
            .unwrap();
        let b = parts(vec![&msg], &tools)
            .encode(Framing::WebSocket)
            .unwrap();
        assert_eq!(a, b);
        assert!(a.starts_with(
            r#"{"type":"response.create","model":"gpt-5.3-codex-spark","instructions":"Be brief.","input":[{"type":"message""#
        ));
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v["store"], false);
        assert_eq!(v["previous_response_id"], "resp_1");
        assert_eq!(v["tools"][0]["name"], "apply_patch");
        assert!(v.get("stream").is_none());
        assert!(v.get("generate").is_none());
        // The instructions+tools prefix is identical whatever the input.
        let other = InputItem::user_text("something else entirely");
        let c = parts(vec![&other], &tools)
            .encode(Framing::WebSocket)
            .unwrap();
        let prefix = |s: &str| s[..s.find(r#""input""#).unwrap()].to_owned();
        assert_eq!(prefix(&a), prefix(&c));
        let tools_at = |s: &str| s[s.find(r#""tools""#).unwrap()..].to_owned();
        assert_eq!(
            tools_at(&a).replace("resp_1", ""),
            tools_at(&c).replace("resp_1", "")
        );
    }

    #[test]
    fn prewarm_and_http_framing() {
        let tools = [Tool::apply_patch()];
        let mut p = parts(vec![], &tools);
        p.generate = false;
        p.previous_response_id = None;
        let v: serde_json::Value =
            serde_json::from_str(&p.encode(Framing::WebSocket).unwrap()).unwrap();
        assert_eq!(v["generate"], false);
        assert!(v.get("previous_response_id").is_none());

        let mut p = parts(vec![], &tools);
        p.tool_choice = Some(ToolChoice::Auto);
        p.prompt_cache_key = Some("repo-1");
        let v: serde_json::Value = serde_json::from_str(&p.encode(Framing::Http).unwrap()).unwrap();
        assert!(v.get("type").is_none());
        assert_eq!(v["stream"], true);
        assert_eq!(v["tool_choice"], "auto");
        assert_eq!(v["prompt_cache_key"], "repo-1");
        assert!(v.get("generate").is_none());
    }

    fn ev(v: serde_json::Value) -> ServerEvent {
        parse_event(&v.to_string()).unwrap()
    }

    #[test]
    fn parses_each_event_type() {
        assert_eq!(
            ev(json!({"type":"response.created","sequence_number":0,
                "response":{"id":"resp_1","object":"response","status":"in_progress","output":[],
                "instructions":"x","tools":[],"usage":null}})),
            ServerEvent::Created {
                id: "resp_1".into()
            }
        );
        assert_eq!(
            ev(
                json!({"type":"response.output_item.added","sequence_number":1,"output_index":0,
                "item":{"type":"custom_tool_call","id":"ctc_1","call_id":"call_1","name":"apply_patch","input":"","status":"in_progress"}})
            ),
            ServerEvent::OutputItemAdded {
                output_index: 0,
                item: OutputItem::CustomToolCall {
                    id: "ctc_1".into(),
                    call_id: "call_1".into(),
                    name: "apply_patch".into(),
                    input: String::new()
                }
            }
        );
        assert_eq!(
            ev(
                json!({"type":"response.output_text.delta","sequence_number":2,"item_id":"msg_1",
                "output_index":0,"content_index":0,"delta":"Hel","logprobs":[]})
            ),
            ServerEvent::OutputTextDelta {
                item_id: "msg_1".into(),
                delta: "Hel".into()
            }
        );
        assert_eq!(
            ev(
                json!({"type":"response.custom_tool_call_input.delta","sequence_number":3,
                "item_id":"ctc_1","output_index":0,"delta":"*** Begin"})
            ),
            ServerEvent::CustomToolCallInputDelta {
                item_id: "ctc_1".into(),
                delta: "*** Begin".into()
            }
        );
        assert_eq!(
            ev(
                json!({"type":"response.function_call_arguments.delta","sequence_number":4,
                "item_id":"fc_1","output_index":1,"delta":"{\"in"})
            ),
            ServerEvent::FunctionCallArgumentsDelta {
                item_id: "fc_1".into(),
                delta: "{\"in".into()
            }
        );
        assert!(matches!(
            ev(json!({"type":"response.output_item.done","sequence_number":5,"output_index":0,
                "item":{"type":"message","id":"msg_1","role":"assistant","status":"completed",
                "content":[{"type":"output_text","text":"Hello","annotations":[]}]}})),
            ServerEvent::OutputItemDone { output_index: 0, item } if item.text().as_deref() == Some("Hello")
        ));
        let done = ev(
            json!({"type":"response.completed","sequence_number":6,"response":{
            "id":"resp_1","status":"completed",
            "output":[{"type":"reasoning","id":"rs_1","summary":[]},
                      {"type":"custom_tool_call","id":"ctc_1","call_id":"call_1","name":"apply_patch","input":"*** Begin Patch\n*** End Patch\n","status":"completed"},
                      {"type":"web_search_call","id":"ws_1"}],
            "usage":{"input_tokens":100,"input_tokens_details":{"cached_tokens":64},
                     "output_tokens":20,"output_tokens_details":{"reasoning_tokens":5},"total_tokens":120}}}),
        );
        let ServerEvent::Completed { response } = done else {
            panic!("{done:?}")
        };
        assert_eq!(response.id, "resp_1");
        assert_eq!(response.output.len(), 3);
        assert_eq!(response.output[2], OutputItem::Other);
        let usage = response.usage.unwrap();
        assert_eq!(
            (
                usage.input_tokens,
                usage.input_tokens_details.cached_tokens,
                usage.output_tokens
            ),
            (100, 64, 20)
        );
        assert!(matches!(
            ev(json!({"type":"response.failed","response":{"id":"resp_2","status":"failed",
                "error":{"code":"server_error","message":"boom"}}})),
            ServerEvent::Failed { response } if response.error.as_ref().and_then(|e| e.code.as_deref()) == Some("server_error")
        ));
        assert!(matches!(
            ev(json!({"type":"response.incomplete","response":{"id":"resp_3","status":"incomplete",
                "incomplete_details":{"reason":"max_output_tokens"}}})),
            ServerEvent::Incomplete { response } if response.incomplete_details.as_ref().and_then(|d| d.reason.as_deref()) == Some("max_output_tokens")
        ));
        assert_eq!(
            ev(json!({"type":"response.in_progress","response":{"id":"resp_1"}})),
            ServerEvent::Other("response.in_progress".into())
        );
    }

    #[test]
    fn parses_both_error_shapes() {
        // WebSocket mode: nested under `error`, with an HTTP-like status.
        assert_eq!(
            ev(
                json!({"type":"error","status":400,"error":{"type":"invalid_request_error",
                "code":"previous_response_not_found","message":"Previous response with id 'resp_1' not found.",
                "param":"previous_response_id"}})
            ),
            ServerEvent::Error {
                code: Some(PREVIOUS_RESPONSE_NOT_FOUND.into()),
                message: "Previous response with id 'resp_1' not found.".into(),
                status: Some(400)
            }
        );
        // Streaming reference: flat.
        assert_eq!(
            ev(
                json!({"type":"error","sequence_number":2,"code":"websocket_connection_limit_reached",
                "message":"limit","param":null})
            ),
            ServerEvent::Error {
                code: Some(CONNECTION_LIMIT_REACHED.into()),
                message: "limit".into(),
                status: None
            }
        );
        assert_eq!(
            error_from_http(
                400,
                br#"{"error":{"message":"nope","type":"invalid_request_error","param":null,"code":"previous_response_not_found"}}"#
            ),
            ServerEvent::Error {
                code: Some(PREVIOUS_RESPONSE_NOT_FOUND.into()),
                message: "nope".into(),
                status: Some(400)
            }
        );
        assert!(matches!(error_from_http(502, b"<html>bad gateway</html>"),
            ServerEvent::Error { code: None, status: Some(502), message } if message.contains("bad gateway")));
    }

    #[test]
    fn output_items_replay_as_input() {
        let item = OutputItem::CustomToolCall {
            id: "ctc_1".into(),
            call_id: "call_1".into(),
            name: "apply_patch".into(),
            input: "p".into(),
        };
        assert_eq!(
            item.to_input(),
            Some(InputItem::CustomToolCall {
                call_id: "call_1".into(),
                name: "apply_patch".into(),
                input: "p".into()
            })
        );
        assert_eq!(OutputItem::Reasoning { id: "r".into() }.to_input(), None);
    }

    #[test]
    fn lane_events_carry_their_stream_id_and_refusals_are_recognised() {
        let mut body = parts(vec![], &[]);
        body.stream_id = Some("repo-1.2");
        let ws = body.encode(Framing::WebSocket).expect("encode");
        assert!(ws.ends_with(r#","stream_id":"repo-1.2"}"#), "{ws}");
        let mut body = parts(vec![], &[]);
        body.stream_id = Some("repo-1.2");
        let http = body.encode(Framing::Http).expect("encode");
        assert!(!http.contains("stream_id"), "{http}");

        let e = parse_lane_event(
            r#"{"type":"response.created","stream_id":"a.1","response":{"id":"resp_9"}}"#,
        )
        .expect("parse");
        assert_eq!(e.stream_id.as_deref(), Some("a.1"));
        assert!(matches!(e.event, ServerEvent::Created { ref id } if id == "resp_9"));
        assert!(!e.refuses_lanes);

        let refused = r#"{"type":"error","status":400,"error":{"type":"invalid_request_error","code":"unknown_parameter","message":"Unknown parameter: 'stream_id'.","param":"stream_id"}}"#;
        let e = parse_lane_event(refused).expect("parse");
        assert!(e.refuses_lanes && e.stream_id.is_none());
        // Another unknown parameter is an ordinary refusal of that request.
        let other = refused.replace(r#""param":"stream_id""#, r#""param":"frobnicate""#);
        assert!(!parse_lane_event(&other).expect("parse").refuses_lanes);
        let limit = r#"{"type":"error","stream_id":"a.1","error":{"code":"stream_limit_reached","message":"m","param":"stream_id"}}"#;
        let e = parse_lane_event(limit).expect("parse");
        assert!(!e.refuses_lanes);
        assert!(
            matches!(e.event, ServerEvent::Error { ref code, .. } if code.as_deref() == Some("stream_limit_reached"))
        );
    }
}
