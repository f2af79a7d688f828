//! Notifications the daemon pushes to connections that called `subscribe`. Editors use them to
//! reload buffers; they are sent as `{"jsonrpc":"2.0","method":"event","params":<Event>}`.

use serde::{Deserialize, Serialize};

/// The notification method name that carries an [`Event`].
pub const EVENT_METHOD: &str = "event";

/// Something happened that a client may want to react to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// An edit landed in the worktree; reload these files.
    EditApplied {
        repo: String,
        edit: String,
        files: Vec<String>,
    },
    /// An edit was reverted (undo or stash); reload these files.
    EditReverted {
        repo: String,
        edit: String,
        files: Vec<String>,
    },
    /// Files changed on disk (seen by the watcher).
    FilesChanged { repo: String, paths: Vec<String> },
    /// A provider session connected, disconnected or rotated.
    SessionState { repo: String, state: SessionState },
    /// A `spark!` comment trigger started running (its pair: [`Event::TriggerFinished`]).
    /// `line` is 1-based, as the comment stood when the file settled.
    TriggerStarted {
        repo: String,
        trigger: String,
        path: String,
        line: u32,
        instruction: String,
    },
    /// A trigger ended: `edit` when it landed (the comment removed in that edit), else `error`
    /// says why and the comment is still there.
    TriggerFinished {
        repo: String,
        trigger: String,
        path: String,
        line: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        edit: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The daemon is shutting down; the connection will close.
    Stopping,
}

/// What a repository's provider session just did, in the `session_state` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Connected in WebSocket mode.
    #[serde(rename = "connected_websocket")]
    ConnectedWebSocket,
    /// Connected over HTTP + SSE (configured, or after a fallback).
    ConnectedHttp,
    /// The WebSocket upgrade was refused; HTTP + SSE from now on.
    FellBackToHttp,
    /// The connection was lost; it is reopened when needed (or in the background).
    Lost,
    /// Connecting failed; retried with backoff.
    ConnectFailed,
    /// The connection is replaced before the provider's age limit.
    Rotating,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_are_tagged_by_type() {
        let e = Event::EditApplied {
            repo: "/r".into(),
            edit: "abc".into(),
            files: vec!["a".into()],
        };
        let v = serde_json::to_value(&e).expect("ser");
        assert_eq!(
            v,
            json!({"type":"edit_applied","repo":"/r","edit":"abc","files":["a"]})
        );
        assert_eq!(serde_json::from_value::<Event>(v).expect("de"), e);
        assert_eq!(
            serde_json::to_value(Event::Stopping).expect("ser"),
            json!({"type":"stopping"})
        );
    }

    #[test]
    fn session_states_have_snake_case_wire_names() {
        let all = [
            (SessionState::ConnectedWebSocket, "connected_websocket"),
            (SessionState::ConnectedHttp, "connected_http"),
            (SessionState::FellBackToHttp, "fell_back_to_http"),
            (SessionState::Lost, "lost"),
            (SessionState::ConnectFailed, "connect_failed"),
            (SessionState::Rotating, "rotating"),
        ];
        for (state, name) in all {
            let e = Event::SessionState {
                repo: "/r".into(),
                state,
            };
            let v = serde_json::to_value(&e).expect("ser");
            assert_eq!(
                v,
                json!({"type": "session_state", "repo": "/r", "state": name})
            );
            assert_eq!(serde_json::from_value::<Event>(v).expect("de"), e);
        }
        // A state this build does not know is refused, not guessed.
        assert!(
            serde_json::from_value::<Event>(
                json!({"type": "session_state", "repo": "/r", "state": "asleep"})
            )
            .is_err()
        );
    }
}
