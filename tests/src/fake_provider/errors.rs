//! Errors in the real service's shapes: the JSON bodies and status codes it answers with.

use super::*;

/// An API error, rendered as a WebSocket `error` event or an HTTP error body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status} {code:?}: {message}")]
pub struct ApiError {
    pub status: u16,
    /// `invalid_request_error`, `rate_limit_error`, `server_error`, …
    pub kind: String,
    pub code: Option<String>,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub(super) fn invalid(
        code: Option<&str>,
        message: impl Into<String>,
        param: Option<&str>,
    ) -> ApiError {
        ApiError {
            status: 400,
            kind: "invalid_request_error".to_owned(),
            code: code.map(str::to_owned),
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }

    pub(super) fn scripted(status: u16, code: &str, message: &str) -> ApiError {
        let kind = match status {
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        ApiError {
            status,
            kind: kind.to_owned(),
            code: Some(code.to_owned()),
            message: message.to_owned(),
            param: None,
        }
    }

    pub(super) fn previous_not_found(id: &str) -> ApiError {
        ApiError::invalid(
            Some("previous_response_not_found"),
            format!("Previous response with id '{id}' not found."),
            Some("previous_response_id"),
        )
    }

    pub(super) fn lifetime_reached() -> ApiError {
        ApiError::invalid(
            Some("websocket_connection_limit_reached"),
            "Responses websocket connection limit reached (60 minutes). Create a new websocket connection to continue.",
            None,
        )
    }

    fn error_object(&self) -> Value {
        json!({
            "type": self.kind,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        })
    }

    /// The WebSocket-mode `error` event (no `sequence_number`: it belongs to no response).
    pub fn ws_event(&self) -> Value {
        json!({ "type": "error", "status": self.status, "error": self.error_object() })
    }

    /// The HTTP error body.
    pub fn http_body(&self) -> Value {
        json!({ "error": self.error_object() })
    }
}
