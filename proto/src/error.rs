//! The stable error codes of the local socket. Numbers never change meaning; new failures get new
//! numbers. Standard JSON-RPC codes first, then spark's own in the server-error range.

use serde::{Deserialize, Serialize};

/// Every error a client can receive. The numeric value is the wire `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not valid JSON.
    ParseError,
    /// Valid JSON, but not a JSON-RPC request.
    InvalidRequest,
    /// No such method in this protocol version.
    MethodNotFound,
    /// The params do not fit the method.
    InvalidParams,
    /// A bug or an unexpected failure inside the daemon.
    Internal,
    /// A request other than `initialize` arrived before the handshake.
    NotInitialized,
    /// The client speaks another protocol version.
    VersionMismatch,
    /// The line exceeded [`crate::MAX_LINE_BYTES`]; it was skipped.
    LineTooLong,
    /// The daemon is stopping and takes no new work.
    ShuttingDown,
    /// Too much work queued; retry shortly.
    Overloaded,
    /// The request was cancelled (by the client, or by a newer request in the same repository).
    Cancelled,
    /// The directory is not inside a git working tree.
    NotARepository,
    /// The edit was refused: a path, a patch or a target failed validation. Nothing was written.
    EditRejected,
    /// The patch's context does not match the file. Nothing was written.
    PatchMismatch,
    /// The file changed under the edit and the changes overlap. Nothing was written.
    Conflict,
    /// No edit with that id in this repository.
    UnknownEdit,
    /// The model provider failed or could not be reached.
    Provider,
}

impl ErrorCode {
    /// Every code, for documentation and exhaustiveness tests.
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::ParseError,
        ErrorCode::InvalidRequest,
        ErrorCode::MethodNotFound,
        ErrorCode::InvalidParams,
        ErrorCode::Internal,
        ErrorCode::NotInitialized,
        ErrorCode::VersionMismatch,
        ErrorCode::LineTooLong,
        ErrorCode::ShuttingDown,
        ErrorCode::Overloaded,
        ErrorCode::Cancelled,
        ErrorCode::NotARepository,
        ErrorCode::EditRejected,
        ErrorCode::PatchMismatch,
        ErrorCode::Conflict,
        ErrorCode::UnknownEdit,
        ErrorCode::Provider,
    ];

    /// The numeric wire code.
    pub const fn code(self) -> i64 {
        match self {
            ErrorCode::ParseError => -32700,
            ErrorCode::InvalidRequest => -32600,
            ErrorCode::MethodNotFound => -32601,
            ErrorCode::InvalidParams => -32602,
            ErrorCode::Internal => -32603,
            ErrorCode::NotInitialized => -32000,
            ErrorCode::VersionMismatch => -32001,
            ErrorCode::LineTooLong => -32002,
            ErrorCode::ShuttingDown => -32003,
            ErrorCode::Overloaded => -32004,
            ErrorCode::Cancelled => -32005,
            ErrorCode::NotARepository => -32010,
            ErrorCode::EditRejected => -32020,
            ErrorCode::PatchMismatch => -32021,
            ErrorCode::Conflict => -32022,
            ErrorCode::UnknownEdit => -32023,
            ErrorCode::Provider => -32030,
        }
    }

    pub fn from_code(code: i64) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Whether the failure is the request's fault (exit 1) rather than the daemon's (exit 2).
    pub const fn is_refusal(self) -> bool {
        match self {
            ErrorCode::InvalidParams
            | ErrorCode::VersionMismatch
            | ErrorCode::NotARepository
            | ErrorCode::EditRejected
            | ErrorCode::PatchMismatch
            | ErrorCode::Conflict
            | ErrorCode::UnknownEdit => true,
            ErrorCode::ParseError
            | ErrorCode::InvalidRequest
            | ErrorCode::MethodNotFound
            | ErrorCode::Internal
            | ErrorCode::NotInitialized
            | ErrorCode::LineTooLong
            | ErrorCode::ShuttingDown
            | ErrorCode::Overloaded
            | ErrorCode::Cancelled
            | ErrorCode::Provider => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.code()), "duplicate code {}", c.code());
            assert_eq!(ErrorCode::from_code(c.code()), Some(c));
        }
        assert_eq!(ErrorCode::from_code(1), None);
    }
}
