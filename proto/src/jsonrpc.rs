//! JSON-RPC 2.0 envelopes. Params and results stay `serde_json::Value` here; [`crate::methods`]
//! gives them types.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ErrorCode;

/// A request id: JSON-RPC allows numbers and strings; `null` is kept for error replies to
/// requests whose id could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Id {
    Number(i64),
    String(String),
    Null,
}

/// The `"jsonrpc": "2.0"` marker; any other value fails to deserialize.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Version;

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("2.0")
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = String::deserialize(d)?;
        if v == "2.0" {
            Ok(Version)
        } else {
            Err(serde::de::Error::custom(format!(
                "unsupported jsonrpc version {v:?}, expected \"2.0\""
            )))
        }
    }
}

/// A call from client to daemon; answered by a [`Response`] with the same id. Read only from a
/// JSON object: serde would also fill the struct from an array (`["2.0", 1, "status"]`), which
/// JSON-RPC 2.0 reads as a batch, and spark takes no batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Map<String, Value>")]
pub struct Request {
    pub jsonrpc: Version,
    pub id: Id,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
}

/// The fields of a [`Request`], read from its object.
#[derive(Deserialize)]
struct RequestFields {
    jsonrpc: Version,
    id: Id,
    method: String,
    #[serde(default)]
    params: Option<Value>,
}

impl TryFrom<serde_json::Map<String, Value>> for Request {
    type Error = serde_json::Error;

    fn try_from(object: serde_json::Map<String, Value>) -> Result<Self, Self::Error> {
        let RequestFields {
            jsonrpc,
            id,
            method,
            params,
        } = serde_json::from_value(Value::Object(object))?;
        Ok(Request {
            jsonrpc,
            id,
            method,
            params,
        })
    }
}

/// The answer to a [`Request`]: exactly one of `result` and `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub jsonrpc: Version,
    pub id: Id,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

impl Response {
    pub fn ok(id: Id, result: Value) -> Self {
        Response {
            jsonrpc: Version,
            id,
            result: Some(result),
            error: None,
        }
    }

    pub fn err(id: Id, error: RpcError) -> Self {
        Response {
            jsonrpc: Version,
            id,
            result: None,
            error: Some(error),
        }
    }

    /// The result, or the error object, as a `Result`.
    pub fn into_result(self) -> Result<Value, RpcError> {
        match (self.result, self.error) {
            (_, Some(e)) => Err(e),
            (Some(v), None) => Ok(v),
            (None, None) => Ok(Value::Null),
        }
    }
}

/// A message without an id: pushed by the daemon (events, progress). Never answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub jsonrpc: Version,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
}

impl Notification {
    pub fn new(method: impl Into<String>, params: Value) -> Self {
        Notification {
            jsonrpc: Version,
            method: method.into(),
            params: Some(params),
        }
    }
}

/// Any line a client may receive from the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Message {
    Response(Response),
    Notification(Notification),
}

/// A JSON-RPC error object. `code` is an [`ErrorCode`]; `data` carries a stable machine-readable
/// `kind` (e.g. `"path_parent_dir"`), the path concerned and a hint where there is one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    /// Boxed: every `Result<_, RpcError>` stays small however much detail an error carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<ErrorData>>,
}

/// Structured detail of an [`RpcError`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorData {
    /// Stable snake_case reason, finer than the numeric code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The repository-relative path the error is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// What the user can do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// For a patch that does not match: the numbered lines of the file as it is now that come
    /// closest to what the patch looked for (`  12 | text`), so the patch can be corrected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closest: Option<String>,
}

impl RpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RpcError {
            code: code.code(),
            message: message.into(),
            data: None,
        }
    }

    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.data.get_or_insert_with(Box::default).kind = Some(kind.into());
        self
    }

    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.data.get_or_insert_with(Box::default).path = Some(path.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.data.get_or_insert_with(Box::default).hint = Some(hint.into());
        self
    }

    pub fn with_closest(mut self, lines: impl Into<String>) -> Self {
        self.data.get_or_insert_with(Box::default).closest = Some(lines.into());
        self
    }

    pub fn closest(&self) -> Option<&str> {
        self.data.as_ref().and_then(|d| d.closest.as_deref())
    }

    /// The typed code, if the number is one this version knows.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_code(self.code)
    }

    pub fn kind(&self) -> Option<&str> {
        self.data.as_ref().and_then(|d| d.kind.as_deref())
    }

    pub fn hint(&self) -> Option<&str> {
        self.data.as_ref().and_then(|d| d.hint.as_deref())
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RpcError {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_round_trips_with_and_without_params() {
        let line = r#"{"jsonrpc":"2.0","id":7,"method":"status"}"#;
        let req: Request = serde_json::from_str(line).expect("parse");
        assert_eq!(req.id, Id::Number(7));
        assert_eq!(req.params, None);
        assert_eq!(serde_json::to_string(&req).expect("ser"), line);

        let line = r#"{"jsonrpc":"2.0","id":"a","method":"x","params":{"k":1}}"#;
        let req: Request = serde_json::from_str(line).expect("parse");
        assert_eq!(req.id, Id::String("a".into()));
        assert_eq!(serde_json::to_string(&req).expect("ser"), line);
    }

    #[test]
    fn wrong_jsonrpc_version_is_rejected() {
        let line = r#"{"jsonrpc":"1.0","id":1,"method":"status"}"#;
        let err = serde_json::from_str::<Request>(line).expect_err("must fail");
        assert!(
            err.to_string().contains("unsupported jsonrpc version"),
            "{err}"
        );
    }

    #[test]
    fn message_distinguishes_responses_from_notifications() {
        let r: Message =
            serde_json::from_str(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#).expect("r");
        assert!(matches!(r, Message::Response(_)));
        let n: Message =
            serde_json::from_str(r#"{"jsonrpc":"2.0","method":"event","params":{}}"#).expect("n");
        assert!(matches!(n, Message::Notification(_)));
    }

    #[test]
    fn error_object_round_trips_with_data() {
        let e = RpcError::new(ErrorCode::InvalidParams, "bad")
            .with_kind("k")
            .with_hint("h");
        let v = serde_json::to_value(Response::err(Id::Null, e.clone())).expect("ser");
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","id":null,"error":{"code":-32602,"message":"bad","data":{"kind":"k","hint":"h"}}})
        );
        let back: Response = serde_json::from_value(v).expect("de");
        assert_eq!(back.into_result(), Err(e));
    }
}
