//! `ask`: one model call per edit, over a warm session, applied through the edit engine.
//!
//! Each repository has a conversation: a provider session (prewarmed with the instructions,
//! the `apply_patch` tool and the repository outline), the history needed to resend it
//! unchained, and the file contents the model has seen — the compare-and-swap base of its
//! patches. A turn sends only the new items; the patch streams and is parsed as it arrives;
//! once the response completes, the patch is applied all-or-nothing (3-way merged if the user
//! kept typing), and the tool call's output goes at the head of the next turn instead of costing
//! a second round trip now. A newer ask in the same repository cancels the one in flight.

mod context;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use spark_proto::events::Event;
use spark_proto::methods::{AskEvent, AskParams, AskResult, AskTimings, BufferEdit, PatchOp};
use spark_proto::{ErrorCode, RpcError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::config::Config;
use crate::edit::{self, patch::OpKind, patch::StreamEvent, patch::StreamingParser};
use crate::provider::{
    InputItem, OutputItem, SessionConfig, SessionHandle, Tool, TurnEvent, TurnFailure, TurnRequest,
};
use crate::repo::RepoHandle;
use crate::watch::Watchers;

/// What the model is told with every request. Byte-stable: it is resent on every turn.
pub(crate) const INSTRUCTIONS: &str = "You are spark, a fast, precise code-editing agent working in the user's git repository. \
Make the smallest correct edit that does what the user asks, with the apply_patch tool, using paths relative to the repository root. \
Only edit files whose content you were shown, or create new ones. \
If the request needs no change to files, answer briefly in text. Keep any text short.";

/// History kept for unchained resends (and every HTTP + SSE turn, which cannot chain with
/// `store:false`); older turns are dropped whole beyond this.
const MAX_HISTORY_BYTES: usize = 64 * 1024;

/// Output tokens between two progress notifications.
const TOKENS_PER_PROGRESS: u64 = 32;

/// A session for settings other than the daemon's own (a shell that set its own provider,
/// model or key) is closed after this long unused: such shells come and go, and each session
/// holds a connection to the provider.
const OTHER_SETTINGS_IDLE: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// How often idle sessions are looked for between asks: a minute late is harmless.
const IDLE_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The provider settings a conversation's session uses: the daemon's own, with whatever the
/// asking shell set on top. Conversations are kept per repository and per these settings.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct ProviderChoice {
    pub(crate) url: String,
    pub(crate) model: String,
    api_key: Option<Arc<str>>,
}

impl std::fmt::Debug for ProviderChoice {
    // Hand-written so the key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderChoice")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl ProviderChoice {
    /// The key to connect with (for sessions opened outside a conversation, e.g. drafts).
    pub(crate) fn api_key(&self) -> Option<Arc<str>> {
        self.api_key.clone()
    }

    /// Refuse settings that cannot work before anything connects: a bad URL, or no key for a
    /// provider that needs one (any that is not on this machine).
    fn check(&self) -> Result<(), RpcError> {
        if let Err(e) = crate::config::validate_provider_url(&self.url) {
            return Err(RpcError::new(ErrorCode::InvalidParams, e.to_string())
                .with_kind("bad_provider_url")
                .with_hint("set SPARK_PROVIDER_URL to a ws://, wss://, http:// or https:// Responses endpoint"));
        }
        if self.api_key.is_none() && !crate::config::is_loopback_url(&self.url) {
            return Err(RpcError::new(
                ErrorCode::Provider,
                format!("no API key for {}; nothing was sent", self.url),
            )
            .with_kind("no_api_key")
            .with_hint(
                "set SPARK_API_KEY (or OPENAI_API_KEY) in the shell you ask from, e.g. `export SPARK_API_KEY=sk-...`; a provider on a loopback address needs none",
            ));
        }
        Ok(())
    }
}

/// Every repository's conversation.
#[derive(Debug)]
pub(crate) struct Asks {
    url: String,
    api_key: Option<Arc<str>>,
    model: String,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    convs: Mutex<HashMap<(PathBuf, ProviderChoice), Arc<Conversation>>>,
    watchers: Watchers,
    events: tokio::sync::broadcast::Sender<spark_proto::events::Event>,
    /// Corrected patches one ask may request when a patch does not apply.
    repair_attempts: u32,
    /// Read-only tool calls, and bytes of their output, one ask answers.
    tool_calls: u32,
    tool_bytes: usize,
    /// One reconnect policy per provider URL, shared by its sessions of every repository, so a
    /// failing provider sees a few attempts a minute however many repositories are watched.
    backoffs: Mutex<HashMap<String, Arc<crate::provider::backoff::Backoff>>>,
    /// One shared WebSocket connection per provider, a lane per session on it; `None` when
    /// configured off (a connection per session).
    lanes: Option<crate::provider::lanes::LanePool>,
    timing: crate::config::ProviderTiming,
}

/// What an edit did to the worktree, for [`Asks::after_edit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Landed {
    /// Applied (`ask`, `edit/apply`).
    Applied,
    /// Reverted (`edit/undo`, `edit/stash`).
    Reverted,
}

/// Clears a conversation's `current` when its ask ends, unless a newer ask replaced it.
struct CurrentAsk<'c> {
    conv: &'c Conversation,
    number: u64,
}

impl Drop for CurrentAsk<'_> {
    fn drop(&mut self) {
        if let Ok(mut current) = self.conv.current.lock()
            && current.as_ref().is_some_and(|(n, _)| *n == self.number)
        {
            *current = None;
        }
    }
}

#[derive(Debug)]
struct Conversation {
    session: SessionHandle,
    state: tokio::sync::Mutex<ConvState>,
    /// The ask in flight (a number unique to it, and its token), cancelled by the next one
    /// (steering) or by `cancel`; cleared when it ends.
    current: Mutex<Option<(u64, CancellationToken)>>,
    created: Instant,
    /// When an ask last used it: idle sessions for other settings are closed.
    last_used: Mutex<Instant>,
}

#[derive(Debug, Default)]
struct ConvState {
    /// Everything an unchained resend needs: repo context, user messages, model outputs.
    history: Vec<InputItem>,
    /// Content of each file as the model last saw it.
    seen: HashMap<String, Vec<u8>>,
    warmed: bool,
    /// The watcher's change number when the model last got the outline (or news of it).
    outline_seq: Option<u64>,
}

/// A session as `status` shows it.
#[derive(Debug)]
pub(crate) struct ConvStatus {
    pub(crate) repo: PathBuf,
    pub(crate) connected: bool,
    pub(crate) age_ms: u64,
    pub(crate) rtt_ms: Option<f64>,
    pub(crate) provider: String,
    pub(crate) model: String,
    /// WebSocket mode failed with this provider: the session uses HTTP + SSE for a while.
    pub(crate) fell_back: bool,
    /// The provider's failed connection attempts in a row.
    pub(crate) failures: u32,
    /// Background reconnects have stopped until the next request.
    pub(crate) paused: bool,
    pub(crate) last_error: Option<String>,
    pub(crate) next_attempt_in_ms: Option<u64>,
    /// Its lane on the provider's shared connection, while it has one.
    pub(crate) lane: Option<String>,
    /// The provider refused lanes: the session has a connection of its own.
    pub(crate) lanes_refused: bool,
}

impl Asks {
    pub(crate) fn new(
        config: &Config,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        watchers: Watchers,
        events: tokio::sync::broadcast::Sender<spark_proto::events::Event>,
    ) -> Asks {
        let lanes = config
            .lanes
            .then(|| crate::provider::lanes::LanePool::new(tracker.clone(), shutdown.clone()));
        Asks {
            url: config.provider_url.clone(),
            api_key: config.api_key.as_deref().map(Arc::from),
            model: config.model.clone(),
            tracker,
            shutdown,
            convs: Mutex::new(HashMap::new()),
            watchers,
            events,
            repair_attempts: config.repair_attempts,
            tool_calls: config.tool_calls_per_ask,
            tool_bytes: config.tool_bytes_per_ask,
            backoffs: Mutex::new(HashMap::new()),
            lanes,
            timing: config.provider_timing,
        }
    }

    /// Open and prewarm `repo`'s session in the background (when it is watched), so its first
    /// ask starts warm. Failures are only logged: the ask will try again and report them.
    pub(crate) fn prewarm(self: &Arc<Self>, repo: RepoHandle) {
        let asks = self.clone();
        let provider = self.default_provider();
        if provider.check().is_err() {
            // Nothing could connect (no key): the first ask says why, with a hint.
            tracing::debug!(repo = %repo.workdir().display(), "no prewarm: the provider settings are incomplete");
            return;
        }
        self.tracker.spawn(async move {
            let result = async {
                let conv = asks.conversation(repo.workdir(), &provider)?;
                let mut state = conv.state.lock().await;
                if !state.warmed {
                    asks.warm_up(&conv, &repo, &mut state).await?;
                }
                Ok::<(), RpcError>(())
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(repo = %repo.workdir().display(), error = %e.message, "prewarm failed");
            }
        });
    }

    /// Close idle sessions for other settings even when no ask comes to do it: each holds a
    /// connection to a provider the user may have stopped using.
    pub(crate) fn spawn_idle_sweeper(self: &Arc<Self>) {
        // Weak: the sweeper must not keep the conversations alive past the server.
        let asks = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            let mut tick = tokio::time::interval(IDLE_SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(asks) = asks.upgrade() else { return };
                let default = asks.default_provider();
                if let Ok(mut convs) = asks.convs.lock() {
                    close_idle(&mut convs, &default, Instant::now());
                }
            }
        });
    }

    /// Start the conversation over: the outline as context, prewarmed on the session.
    async fn warm_up(
        &self,
        conv: &Conversation,
        repo: &RepoHandle,
        state: &mut ConvState,
    ) -> Result<(), RpcError> {
        *state = ConvState::default();
        let watchers = self.watchers.clone();
        let (outline, seq) = repo
            .run(move |ctx| {
                (
                    context::outline_text(ctx, &watchers),
                    watchers.seq(ctx.workdir),
                )
            })
            .await?;
        let item = InputItem::developer_text(outline);
        state.history.push(item.clone());
        conv.session
            .prewarm(INSTRUCTIONS.to_owned(), Tool::offered(), vec![item])
            .await
            .map_err(session_error)?;
        state.warmed = true;
        state.outline_seq = seq;
        Ok(())
    }

    /// The daemon's own provider settings (its config and environment).
    fn default_provider(&self) -> ProviderChoice {
        ProviderChoice {
            url: self.url.clone(),
            model: self.model.clone(),
            api_key: self.api_key.clone(),
        }
    }

    /// The settings an ask runs with: what the asking shell set wins over the daemon's own.
    pub(crate) fn provider_for(
        &self,
        asked: Option<&spark_proto::methods::ProviderSettings>,
    ) -> Result<ProviderChoice, RpcError> {
        let mut choice = self.default_provider();
        if let Some(asked) = asked {
            if let Some(url) = &asked.url {
                choice.url = url.clone();
            }
            if let Some(model) = &asked.model {
                choice.model = model.clone();
            }
            if let Some(key) = &asked.api_key {
                choice.api_key = Some(Arc::from(key.as_str()));
            }
        }
        choice.check()?;
        Ok(choice)
    }

    /// Every conversation in `workdir`, whatever its provider settings.
    fn conversations_in(&self, workdir: &Path) -> Vec<Arc<Conversation>> {
        self.convs
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|((w, _), _)| w == workdir)
                    .map(|(_, c)| c.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn conversation(
        &self,
        workdir: &Path,
        provider: &ProviderChoice,
    ) -> Result<Arc<Conversation>, RpcError> {
        let mut convs = self
            .convs
            .lock()
            .map_err(|_| internal("conversation table poisoned"))?;
        let default = self.default_provider();
        close_idle(&mut convs, &default, Instant::now());
        let key = (workdir.to_owned(), provider.clone());
        if let Some(c) = convs.get(&key) {
            if let Ok(mut t) = c.last_used.lock() {
                *t = Instant::now();
            }
            return Ok(c.clone());
        }
        let mut config = SessionConfig::new(
            provider.url.clone(),
            provider.api_key.clone(),
            provider.model.clone(),
        );
        config.instructions = INSTRUCTIONS.to_owned();
        config.tools = Tool::offered();
        config.ping_interval = self.timing.ping_interval;
        config.pong_timeout = self.timing.pong_timeout;
        config.backoff_base = self.timing.backoff_base;
        config.backoff_cap = self.timing.backoff_cap;
        config.stream_idle_timeout = self.timing.stream_idle_timeout;
        config.backoff = Some(self.backoff_for(&provider.url, &config));
        let cache_key = prompt_cache_key(workdir, provider);
        // The lane is named after the (opaque) cache key: no path leaves the machine.
        config.lanes = self.lanes.as_ref().map(|lanes| {
            lanes.lane(
                &provider.url,
                provider.api_key.clone(),
                &format!("repo-{}", cache_key.get(6..22).unwrap_or("x")),
            )
        });
        config.prompt_cache_key = Some(cache_key);
        let (events, repo) = (self.events.clone(), workdir.display().to_string());
        config.on_state = Some(Arc::new(move |state| {
            let _ = events.send(spark_proto::events::Event::SessionState {
                repo: repo.clone(),
                state,
            });
        }));
        let session = crate::provider::spawn(config, &self.tracker, self.shutdown.clone()).map_err(|e| {
            RpcError::new(ErrorCode::Provider, format!("bad provider URL {}: {e}", provider.url))
                .with_hint("set SPARK_PROVIDER_URL to a ws://, wss://, http:// or https:// Responses endpoint")
        })?;
        let conv = Arc::new(Conversation {
            session,
            state: tokio::sync::Mutex::new(ConvState::default()),
            current: Mutex::new(None),
            created: Instant::now(),
            last_used: Mutex::new(Instant::now()),
        });
        convs.insert(key, conv.clone());
        Ok(conv)
    }

    /// Stop the ask in flight in `workdir`, if any (the `cancel` method). True if there was one.
    pub(crate) fn cancel(&self, workdir: &Path) -> bool {
        let mut any = false;
        for conv in self.conversations_in(workdir) {
            let current = conv.current.lock().ok().and_then(|mut c| c.take());
            if let Some((_, token)) = current {
                token.cancel();
                any = true;
            }
        }
        any
    }

    /// The bookkeeping every edit that lands, is undone or is stashed shares, whoever made it
    /// (`edit/apply`, `ask`, `edit/undo`, `edit/stash`): the watcher takes the writes as the
    /// daemon's own, an applied edit is counted, each conversation of the repository forgets
    /// its view of the files (the next ask shows them whole, and the compare-and-swap base
    /// becomes their content at apply time), and subscribers hear of it.
    pub(crate) async fn after_edit(
        &self,
        repo: &RepoHandle,
        outcome: &edit::Outcome,
        landed: Landed,
    ) {
        self.after_edit_by(repo, outcome, landed, None).await;
    }

    /// [`Self::after_edit`] for an edit made by `asker`'s ask: the caller holds that
    /// conversation's state and records there what the model now knows instead.
    async fn after_edit_by(
        &self,
        repo: &RepoHandle,
        outcome: &edit::Outcome,
        landed: Landed,
        asker: Option<&Conversation>,
    ) {
        self.watchers
            .note_own_writes(repo.workdir(), &outcome.after);
        let edit = match (landed, &outcome.edit) {
            // A dry run, or a patch that changed nothing.
            (Landed::Applied, None) => return,
            (Landed::Applied, Some(id)) => {
                repo.count_edit();
                id.clone()
            }
            (Landed::Reverted, id) => id.clone().unwrap_or_default(),
        };
        // Edited buffers were not written: no client should reload them from disk.
        let in_buffer = |p: &str| outcome.buffer_edits.iter().any(|(b, _)| b == p);
        let files: Vec<String> = outcome
            .files
            .iter()
            .filter(|f| !in_buffer(&f.path))
            .map(|f| f.path.clone())
            .collect();
        for conv in self.conversations_in(repo.workdir()) {
            if asker.is_some_and(|a| std::ptr::eq(a, Arc::as_ptr(&conv))) {
                continue;
            }
            let mut state = conv.state.lock().await;
            for p in &files {
                state.seen.remove(p);
            }
        }
        let repo = repo.workdir().display().to_string();
        let _ = self.events.send(match landed {
            Landed::Applied => Event::EditApplied { repo, edit, files },
            Landed::Reverted => Event::EditReverted { repo, edit, files },
        });
    }

    /// Each provider's shared connection, for `status`.
    pub(crate) fn lanes_status(&self) -> Vec<crate::provider::lanes::ProviderLanes> {
        self.lanes
            .as_ref()
            .map(crate::provider::lanes::LanePool::status)
            .unwrap_or_default()
    }

    /// A lane of its own on `provider`'s shared connection, and the provider's reconnect
    /// policy, for work that must not wait behind an ask (a commit-message draft).
    pub(crate) fn side_lane(
        &self,
        provider: &ProviderChoice,
        name: &str,
        config: &SessionConfig,
    ) -> (
        Option<crate::provider::lanes::LaneSpec>,
        Arc<crate::provider::backoff::Backoff>,
    ) {
        (
            self.lanes
                .as_ref()
                .map(|lanes| lanes.lane(&provider.url, provider.api_key.clone(), name)),
            self.backoff_for(&provider.url, config),
        )
    }

    /// The provider's shared reconnect policy, made on first use.
    fn backoff_for(
        &self,
        url: &str,
        config: &SessionConfig,
    ) -> Arc<crate::provider::backoff::Backoff> {
        let mut map = self
            .backoffs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(url.to_owned())
            .or_insert_with(|| {
                Arc::new(crate::provider::backoff::Backoff::new(
                    config.backoff_base,
                    config.backoff_cap,
                    config.max_background_attempts,
                ))
            })
            .clone()
    }

    pub(crate) async fn status(&self) -> Vec<ConvStatus> {
        let convs: Vec<(PathBuf, ProviderChoice, Arc<Conversation>)> = self
            .convs
            .lock()
            .map(|m| {
                m.iter()
                    .map(|((w, p), v)| (w.clone(), p.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut out = Vec::new();
        for (repo, provider, conv) in convs {
            let s = conv.session.status().await.ok();
            out.push(ConvStatus {
                repo,
                connected: s.as_ref().is_some_and(|s| s.connected),
                age_ms: s
                    .as_ref()
                    .and_then(|s| s.age)
                    .unwrap_or_else(|| conv.created.elapsed())
                    .as_millis() as u64,
                rtt_ms: s
                    .as_ref()
                    .and_then(|s| s.last_rtt)
                    .map(|d| d.as_secs_f64() * 1e3),
                provider: provider.url,
                model: provider.model,
                fell_back: s.as_ref().is_some_and(|s| s.fell_back),
                failures: s.as_ref().map_or(0, |s| s.backoff.failures),
                paused: s.as_ref().is_some_and(|s| s.backoff.paused),
                last_error: s.as_ref().and_then(|s| s.last_error.clone()),
                next_attempt_in_ms: s
                    .as_ref()
                    .and_then(|s| s.retry_in)
                    .map(|d| d.as_millis() as u64),
                lane: s.as_ref().and_then(|s| s.lane.clone()),
                lanes_refused: s.as_ref().is_some_and(|s| s.lanes_refused),
            });
        }
        out
    }

    /// Run one ask. `emit` streams progress; `cancel` fires when the client goes away.
    pub(crate) async fn ask<F, Fut>(
        &self,
        repo: RepoHandle,
        cwd_prefix: String,
        params: AskParams,
        cancel: CancellationToken,
        emit: F,
    ) -> Result<AskResult, RpcError>
    where
        F: Fn(AskEvent) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        self.ask_as(repo, cwd_prefix, params, cancel, emit, AskAs::user())
            .await
    }

    /// [`Asks::ask`] for another caller than a user's `ask` (a `spark!` trigger): the same
    /// turn, repair and apply, with the record's source, steering and the patch as `how` says.
    ///
    /// The phases, in order: [`Self::begin`] (the conversation, steering), [`Self::hold`] (its
    /// state, warmed up), [`Self::assemble`] (the context the model has not seen),
    /// [`Self::stream_turn`] (one model call, streamed to the client), [`Self::settle`] (reads
    /// answered, the patch found and checked) and [`Self::land`] (applied, repaired if need be,
    /// recorded and answered).
    pub(crate) async fn ask_as<F, Fut>(
        &self,
        repo: RepoHandle,
        cwd_prefix: String,
        params: AskParams,
        cancel: CancellationToken,
        emit: F,
        how: AskAs,
    ) -> Result<AskResult, RpcError>
    where
        F: Fn(AskEvent) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let started = Instant::now();
        let (conv, number) = self.begin(&repo, &params, &cancel, &how)?;
        let current = CurrentAsk {
            conv: &conv,
            number,
        };
        let mut state = self
            .hold(
                &current,
                &repo,
                params.new_conversation,
                &cancel,
                how.steers,
            )
            .await?;
        let prompt = self
            .assemble(&repo, &cwd_prefix, &params, &mut state)
            .await?;
        let at = AskAt {
            conv: &conv,
            repo: &repo,
            cancel: &cancel,
            shape: how.shape.clone(),
            started,
        };
        let turn = stream_turn(&at, &mut state, Some(prompt.user), &emit).await?;
        // The model has now seen this turn's files.
        state.seen.extend(prompt.seen);
        let (pending, patch, bases) = match self.settle(&at, &mut state, turn, &emit).await? {
            Settled::Answered(result) => return Ok(result),
            Settled::Patch {
                pending,
                patch,
                bases,
            } => (pending, patch, bases),
        };
        let req = edit::ApplyRequest {
            patch,
            cwd_prefix: String::new(),
            dry_run: params.dry_run,
            source: how.source.to_owned(),
            message: how.message.unwrap_or(params.prompt),
            bases,
            buffers: prompt.buffers.text,
        };
        self.land(&at, &mut state, req, pending, &emit).await
    }

    /// The ask's conversation, and the number that makes this ask its current one. A user's
    /// ask replaces the one in flight in the repository (steering), whatever provider
    /// settings that one used; the repository is watched from its first ask on.
    fn begin(
        &self,
        repo: &RepoHandle,
        params: &AskParams,
        cancel: &CancellationToken,
        how: &AskAs,
    ) -> Result<(Arc<Conversation>, u64), RpcError> {
        static NEXT_ASK: AtomicU64 = AtomicU64::new(1);
        let provider = self.provider_for(params.provider.as_ref())?;
        let conv = self.conversation(repo.workdir(), &provider)?;
        self.watchers.ensure_watched(repo.workdir());
        let number = NEXT_ASK.fetch_add(1, Ordering::Relaxed);
        if !how.steers {
            return Ok((conv, number));
        }
        for other in self.conversations_in(repo.workdir()) {
            if !Arc::ptr_eq(&other, &conv)
                && let Some((_, token)) = other.current.lock().ok().and_then(|mut c| c.take())
            {
                token.cancel();
            }
        }
        if let Some((_, old)) = conv
            .current
            .lock()
            .map_err(|_| internal("poisoned"))?
            .replace((number, cancel.clone()))
        {
            old.cancel();
        }
        Ok((conv, number))
    }

    /// The conversation's state for this ask, warmed up if it is new (or the client asked
    /// for a new one). An ask that does not steer waited here for the one in flight; it then
    /// becomes the current one, so a later ask (or `cancel`) still stops it.
    async fn hold<'c>(
        &self,
        current: &CurrentAsk<'c>,
        repo: &RepoHandle,
        new_conversation: bool,
        cancel: &CancellationToken,
        steers: bool,
    ) -> Result<tokio::sync::MutexGuard<'c, ConvState>, RpcError> {
        let conv = current.conv;
        let mut state = tokio::select! {
            s = conv.state.lock() => s,
            () = cancel.cancelled() => return Err(cancelled()),
        };
        if !steers
            && let Ok(mut now) = conv.current.lock()
            && now.is_none()
        {
            *now = Some((current.number, cancel.clone()));
        }
        if new_conversation || !state.warmed {
            self.warm_up(conv, repo, &mut state).await?;
        }
        Ok(state)
    }

    /// The turn's user message: the prompt, with what the model has not seen of the focus,
    /// the unsaved buffers and the outline's news. A refused buffer fails the ask here,
    /// before anything is sent.
    async fn assemble(
        &self,
        repo: &RepoHandle,
        cwd_prefix: &str,
        params: &AskParams,
        state: &mut ConvState,
    ) -> Result<Prompt, RpcError> {
        let seen = state.seen.clone();
        let (prompt, focus) = (params.prompt.clone(), params.focus.clone());
        let prefix = cwd_prefix.to_owned();
        let watchers = self.watchers.clone();
        let outline_seq = state.outline_seq;
        let sent_buffers = params.buffers.clone();
        let (assembled, new_seq, buffers) = repo
            .run(move |ctx| {
                let buffers = context::Buffers::resolve(ctx, &prefix, &sent_buffers)?;
                let news = context::outline_news(ctx, &watchers, outline_seq);
                context::assemble(
                    ctx, &watchers, &prefix, &prompt, &focus, &buffers, &seen, news.text,
                )
                .map(|a| (a, news.seq, buffers))
            })
            .await??;
        if new_seq.is_some() {
            state.outline_seq = new_seq;
        }
        info!(
            target: "audit",
            repo = %repo.workdir().display(),
            files = ?assembled.audit,
            bytes = assembled.text.len(),
            "context sent to the provider"
        );
        Ok(Prompt {
            user: InputItem::user_text(assembled.text),
            seen: assembled.seen,
            buffers,
        })
    }

    /// After the model's turn: its reads answered (more turns), the compare-and-swap base of
    /// its patch fixed, and what there is to apply. A response without a patch is the ask's
    /// answer; an incomplete one, a malformed patch or a cancelled ask applies nothing (the
    /// tool call is answered so).
    async fn settle<F, Fut>(
        &self,
        at: &AskAt<'_>,
        state: &mut ConvState,
        turn: Streamed,
        emit: &F,
    ) -> Result<Settled, RpcError>
    where
        F: Fn(AskEvent) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let turn = if reads(&turn.done.output).is_empty() {
            turn
        } else {
            self.answer_reads(at, state, turn, emit).await?
        };
        // What the model saw is this patch's compare-and-swap base, whatever trimming forgets.
        let bases = state.seen.clone();
        trim_history(state);
        let Streamed {
            done,
            parser,
            patch: streamed,
            deltas,
        } = turn;
        let patch = find_patch(&done.output);
        let mut timings = AskTimings {
            request_ms: ms(done.timings.sent_at.saturating_duration_since(at.started)),
            ttft_ms: done.timings.first_delta.map(ms),
            apply_ms: None,
            total_ms: 0.0,
            output_tokens: done
                .usage
                .as_ref()
                .map(|u| u.output_tokens)
                .unwrap_or(deltas),
            bytes_sent: done.timings.bytes_sent as u64,
            chained: done.chained,
        };
        let answer = done.text();
        if let Some(reason) = &done.incomplete_reason {
            if let Some((call, _)) = &patch {
                answer_tool(
                    at.conv,
                    state,
                    call,
                    "Not applied: the response was incomplete.",
                )
                .await;
            }
            return Err(RpcError::new(
                ErrorCode::Provider,
                format!("the model's response was incomplete ({reason}); nothing was applied"),
            )
            .with_kind("incomplete_response"));
        }
        let Some((call, patch)) = patch else {
            timings.total_ms = ms(at.started.elapsed());
            return Ok(Settled::Answered(AskResult {
                edit: None,
                files: Vec::new(),
                answer,
                diff: String::new(),
                timings,
                buffer_edits: Vec::new(),
            }));
        };
        // The streamed patch was parsed as it arrived: a malformed one is refused right away.
        if matches!(call, Call::Custom(_))
            && streamed == patch
            && let Err(e) = parser.finish()
        {
            let e = edit::EditError::from(e);
            answer_tool(at.conv, state, &call, &format!("Patch rejected: {e}")).await;
            return Err(e.to_rpc());
        }
        if at.cancel.is_cancelled() {
            answer_tool(
                at.conv,
                state,
                &call,
                "Not applied: the user cancelled the request.",
            )
            .await;
            return Err(cancelled());
        }
        Ok(Settled::Patch {
            pending: Pending {
                call,
                answer,
                timings,
            },
            patch,
            bases,
        })
    }

    /// Apply the patch all-or-nothing (3-way merged with what the user typed meanwhile), have
    /// the model repair it if it did not apply and can be fixed, then answer the tool call,
    /// record what the model now knows, and tell every client through the after-edit path.
    async fn land<F, Fut>(
        &self,
        at: &AskAt<'_>,
        state: &mut ConvState,
        req: edit::ApplyRequest,
        pending: Pending,
        emit: &F,
    ) -> Result<AskResult, RpcError>
    where
        F: Fn(AskEvent) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let Pending {
            call,
            answer,
            mut timings,
        } = pending;
        let dry_run = req.dry_run;
        let apply_started = Instant::now();
        let (applied, req) = apply_shaped(at.repo, req, at.shape.clone()).await?;
        timings.apply_ms = Some(ms(apply_started.elapsed()));
        let (applied, call, answer) = match applied {
            Err(e) if repairable(&e) && self.repair_attempts > 0 => {
                let repaired = self.repair(at, state, req, call, e, emit).await?;
                let answer = [answer, repaired.answer].concat();
                (Ok(repaired.outcome), repaired.call, answer)
            }
            other => (other, call, answer),
        };
        let outcome = match applied {
            Ok(outcome) => outcome,
            Err(e) => {
                answer_tool(at.conv, state, &call, &format!("Patch rejected: {e}")).await;
                return Err(e.to_rpc());
            }
        };
        let output = match (&outcome.edit, dry_run) {
            (_, true) => "Not applied: the user asked for a dry run.".to_owned(),
            (Some(id), false) => format!("Applied as edit {id}."),
            (None, false) if !outcome.buffer_edits.is_empty() => {
                "Applied to the user's unsaved editor buffers.".to_owned()
            }
            (None, false) => "Nothing changed: the files already matched.".to_owned(),
        };
        answer_tool(at.conv, state, &call, &output).await;
        self.after_edit_by(at.repo, &outcome, Landed::Applied, Some(at.conv))
            .await;
        // The model now knows each file, and each buffer, as the edit left it.
        if outcome.edit.is_some() {
            for (path, after) in &outcome.after {
                match after {
                    Some(bytes) => state.seen.insert(path.clone(), bytes.clone()),
                    None => state.seen.remove(path),
                };
            }
        }
        for (path, text) in &outcome.buffer_edits {
            state.seen.insert(path.clone(), text.clone());
        }
        timings.total_ms = ms(at.started.elapsed());
        Ok(AskResult {
            buffer_edits: buffer_edits(&outcome.buffer_edits)?,
            edit: outcome.edit,
            files: outcome.files,
            answer,
            diff: outcome.diff,
            timings,
        })
    }
}

/// The user message of an ask's turn, and what comes with it.
struct Prompt {
    user: InputItem,
    /// The files the message shows whole: what the model knows once it is sent.
    seen: HashMap<String, Vec<u8>>,
    /// The unsaved buffers the ask came with: the patch applies to them.
    buffers: context::Buffers,
}

/// What [`Asks::settle`] found to do.
enum Settled {
    /// The model answered without a patch: the ask's result.
    Answered(AskResult),
    /// A patch to apply against `bases` (what the model saw).
    Patch {
        pending: Pending,
        patch: String,
        bases: HashMap<String, Vec<u8>>,
    },
}

/// A patch's ask, until it lands: the tool call to answer, the model's text, the timings so far.
struct Pending {
    call: Call,
    answer: String,
    timings: AskTimings,
}

/// One streamed turn: the finished response, and its patch as it streamed.
struct Streamed {
    done: Box<crate::provider::session::TurnDone>,
    /// The patch parsed as it arrived: a malformed one is known when the turn ends.
    parser: StreamingParser,
    /// The whole tool input streamed (some providers send it only in the final item).
    patch: String,
    /// Output deltas, for progress and when the provider reports no usage.
    deltas: u64,
}

/// One model call on the conversation's warm session: the pending tool outputs, then `user`
/// if any. Text and patch stream to the client as they arrive (the patch's files as it starts
/// them, and a token count every [`TOKENS_PER_PROGRESS`] deltas); `apply_patch` bridged to a
/// function tool by a gateway streams its JSON arguments, decoded, to the same preview. The
/// turn is recorded in the history. Every turn of an ask, the first and each follow-up (reads
/// answered, a repair), runs here.
async fn stream_turn<F, Fut>(
    at: &AskAt<'_>,
    state: &mut ConvState,
    user: Option<InputItem>,
    emit: &F,
) -> Result<Streamed, RpcError>
where
    F: Fn(AskEvent) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut full_context = state.history.clone();
    full_context.extend(user.clone());
    let mut events = at
        .conv
        .session
        .turn(TurnRequest {
            new_input: user.iter().cloned().collect(),
            full_context,
            tool_choice: None,
        })
        .await
        .map_err(session_error)?;
    let mut parser = StreamingParser::new();
    let mut patch = String::new();
    // Bridged `apply_patch` calls by item id (read-only tools stream their arguments too).
    let mut bridged: HashMap<String, crate::provider::arguments::ArgumentStream> = HashMap::new();
    let mut deltas = 0u64;
    let mut first_delta: Option<Instant> = None;
    let done = loop {
        let event = tokio::select! {
            biased;
            () = at.cancel.cancelled() => {
                // No cancel event exists: the session closes the socket and re-warms.
                let _ = at.conv.session.cancel().await;
                return Err(cancelled());
            }
            e = events.recv() => e,
        };
        let counted = matches!(
            event,
            Some(
                TurnEvent::TextDelta { .. }
                    | TurnEvent::ToolInputDelta { .. }
                    | TurnEvent::FunctionArgumentsDelta { .. }
            )
        );
        match event {
            None => return Err(internal("the provider session ended during the request")),
            Some(TurnEvent::TextDelta { delta, .. }) => emit(AskEvent::Text { delta }).await,
            Some(TurnEvent::ToolInputDelta { delta, .. }) => {
                patch.push_str(&delta);
                preview_patch(&mut parser, delta, emit).await;
            }
            Some(TurnEvent::FunctionArgumentsDelta { item_id, delta }) => {
                if let Some(args) = bridged.get_mut(&item_id) {
                    let delta = args.push(&delta);
                    if !delta.is_empty() {
                        preview_patch(&mut parser, delta, emit).await;
                    }
                }
            }
            Some(TurnEvent::ItemAdded(OutputItem::FunctionCall { id, name, .. }))
                if name == crate::provider::wire::APPLY_PATCH_TOOL =>
            {
                bridged.insert(id, Default::default());
            }
            Some(TurnEvent::Done(done)) => break done,
            Some(TurnEvent::Failed(f)) => return Err(turn_failure(f)),
            Some(TurnEvent::Started { response_id }) => {
                tracing::debug!(%response_id, "response started");
            }
            Some(TurnEvent::ItemAdded(_)) => {}
        }
        if counted {
            let first = *first_delta.get_or_insert_with(Instant::now);
            deltas += 1;
            if deltas.is_multiple_of(TOKENS_PER_PROGRESS) {
                let secs = first.elapsed().as_secs_f64();
                let rate = if secs > 0.0 {
                    deltas as f64 / secs
                } else {
                    0.0
                };
                emit(AskEvent::Tokens {
                    output_tokens: deltas,
                    tokens_per_s: rate,
                })
                .await;
            }
        }
    };
    state.history.extend(user);
    state
        .history
        .extend(done.output.iter().filter_map(OutputItem::to_input));
    Ok(Streamed {
        done,
        parser,
        patch,
        deltas,
    })
}

/// The wire form of an apply's buffer edits: text, as the buffers came (a patch applied to
/// text yields text).
fn buffer_edits(edits: &[(String, Vec<u8>)]) -> Result<Vec<BufferEdit>, RpcError> {
    edits
        .iter()
        .map(|(path, bytes)| {
            String::from_utf8(bytes.clone())
                .map(|text| BufferEdit {
                    path: path.clone(),
                    text,
                })
                .map_err(|_| internal("an edited buffer is not UTF-8"))
        })
        .collect()
}

/// Close the sessions for other settings than the daemon's own that no ask used for
/// [`OTHER_SETTINGS_IDLE`] and that have none in flight: dropping the last handle ends the
/// session and its connection.
fn close_idle(
    convs: &mut HashMap<(PathBuf, ProviderChoice), Arc<Conversation>>,
    default: &ProviderChoice,
    now: Instant,
) {
    convs.retain(|(_, provider), conv| {
        let idle = conv
            .last_used
            .lock()
            .map(|t| now.saturating_duration_since(*t) >= OTHER_SETTINGS_IDLE)
            .unwrap_or(false);
        let busy = conv.current.lock().map(|c| c.is_some()).unwrap_or(true);
        provider == default || busy || !idle
    });
}

/// What every phase of an ask after the first needs of it: its conversation, repository and
/// token, and when it started.
struct AskAt<'a> {
    conv: &'a Conversation,
    repo: &'a RepoHandle,
    cancel: &'a CancellationToken,
    /// How the patch is rewritten before it applies (a corrected one as the first).
    shape: Option<Shape>,
    started: Instant,
}

/// Rewrites the model's patch before it applies, given what the model saw of each file and the
/// worktree; `None` applies it as it came. Runs on the repository's actor.
pub(crate) type Shape =
    Arc<dyn Fn(&str, &HashMap<String, Vec<u8>>, &Path) -> Option<String> + Send + Sync>;

/// Who an ask runs for, and so how its edit is recorded ([`Asks::ask_as`]).
pub(crate) struct AskAs {
    /// The record's source, as `edit/log` shows it.
    pub(crate) source: &'static str,
    /// The record's message; default: the prompt.
    pub(crate) message: Option<String>,
    /// Cancels the ask in flight in the repository (a user's `ask` does; a trigger waits).
    pub(crate) steers: bool,
    pub(crate) shape: Option<Shape>,
}

impl AskAs {
    fn user() -> AskAs {
        AskAs {
            source: "ask",
            message: None,
            steers: true,
            shape: None,
        }
    }
}

/// Apply `req` on the actor, its patch rewritten by `shape` first; the request comes back for
/// a repair round.
async fn apply_shaped(
    repo: &RepoHandle,
    mut req: edit::ApplyRequest,
    shape: Option<Shape>,
) -> Result<(Result<edit::Outcome, edit::EditError>, edit::ApplyRequest), RpcError> {
    repo.run(move |ctx| {
        if let Some(shaped) = shape
            .as_ref()
            .and_then(|shape| shape(&req.patch, &req.bases, ctx.workdir))
        {
            req.patch = shaped;
        }
        (edit::apply(ctx, &req), req)
    })
    .await
}

/// A corrected patch that landed.
struct Repaired {
    outcome: edit::Outcome,
    /// The tool call the corrected patch came in, answered like any other.
    call: Call,
    answer: String,
}

/// Streams one piece of the patch to the client: the files it starts, then the text.
async fn preview_patch<F, Fut>(parser: &mut StreamingParser, delta: String, emit: &F)
where
    F: Fn(AskEvent) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for e in parser.push(&delta) {
        if let StreamEvent::FileStarted { path, kind } = e {
            emit(AskEvent::PatchFile {
                path,
                op: match kind {
                    OpKind::Add => PatchOp::Add,
                    OpKind::Update => PatchOp::Update,
                    OpKind::Delete => PatchOp::Delete,
                },
            })
            .await;
        }
    }
    emit(AskEvent::Patch { delta }).await;
}

/// The patch in a function call's JSON arguments: the `input` string (spark's own function
/// variant), else the object's only string value (a gateway's bridge names it as it likes, e.g.
/// LiteLLM's `content`), else a bare JSON string, else the text as it came.
fn patch_argument(arguments: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(arguments) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Object(map)) => {
            if let Some(s) = map.get("input").and_then(|v| v.as_str()) {
                return s.to_owned();
            }
            let mut strings = map.values().filter_map(|v| v.as_str());
            match (strings.next(), strings.next()) {
                (Some(only), None) => only.to_owned(),
                _ => arguments.to_owned(),
            }
        }
        _ => arguments.to_owned(),
    }
}

/// The `prompt_cache_key` of a conversation: the same for every ask in one repository with one
/// provider and model (so unchained resends hit the provider's prompt cache), and opaque: a
/// local path never leaves the machine. 128 bits of two keyed SipHash runs; a change of the
/// hash between releases costs one cache miss.
fn prompt_cache_key(workdir: &std::path::Path, provider: &ProviderChoice) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let half = |salt: &str| {
        let mut h = std::hash::DefaultHasher::new();
        salt.hash(&mut h);
        workdir.hash(&mut h);
        provider.url.hash(&mut h);
        provider.model.hash(&mut h);
        h.finish()
    };
    format!(
        "spark-{:016x}{:016x}",
        half("spark cache key a"),
        half("spark cache key b")
    )
}

/// Failures the model can fix by rewriting its patch: lines it misremembered, lines that match
/// in more than one place, or a patch gone stale because the user changed the same lines while
/// the model wrote it (the model is shown what they changed and writes on top of it). A refused
/// path or a binary file is not the patch's wording, so it is reported at once.
fn repairable(e: &edit::EditError) -> bool {
    match e {
        edit::EditError::Match { source, .. } => source.code() != "binary_content",
        edit::EditError::Conflict { .. } => true,
        _ => false,
    }
}

impl Asks {
    /// The patch did not apply: tell the model why on the same session, with the lines of the
    /// file closest to what it looked for (numbered), and apply its corrected patch, up to the
    /// configured number of times. Each round resends no file: the model saw them already.
    /// When every round fails, nothing is written and the error gives every reason.
    async fn repair<F, Fut>(
        &self,
        at: &AskAt<'_>,
        state: &mut ConvState,
        mut req: edit::ApplyRequest,
        mut call: Call,
        mut error: edit::EditError,
        emit: &F,
    ) -> Result<Repaired, RpcError>
    where
        F: Fn(AskEvent) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut reasons = vec![error.to_string()];
        for attempt in 1..=self.repair_attempts {
            let reason = error.to_string();
            emit(AskEvent::Repair {
                attempt,
                reason: reason.clone(),
            })
            .await;
            let hint = match &error {
                edit::EditError::Conflict { path } => {
                    self.users_changes(at.repo, &mut req.bases, state, path)
                        .await
                }
                _ => self.closest_lines(at.repo, &req.bases, &error).await,
            };
            answer_tool(at.conv, state, &call, &format!("Patch rejected: {reason}")).await;
            info!(repo = %at.repo.workdir().display(), attempt, "asking the model to repair its patch");
            // The reason is in the tool output already, unless the patch came in message text.
            let reason_shown = !matches!(call, Call::None);
            let request = repair_request(&error, hint, reason_shown);
            let done = follow_up_turn(at, state, Some(request), emit).await?.done;
            let Some((next_call, patch)) = find_patch(&done.output) else {
                reasons.push("the model answered without a patch".to_owned());
                return Err(repair_failed(error.to_rpc(), &reasons));
            };
            if let Some(why) = &done.incomplete_reason {
                answer_tool(
                    at.conv,
                    state,
                    &next_call,
                    "Not applied: the response was incomplete.",
                )
                .await;
                reasons.push(format!("the corrected response was incomplete ({why})"));
                return Err(repair_failed(error.to_rpc(), &reasons));
            }
            if at.cancel.is_cancelled() {
                answer_tool(
                    at.conv,
                    state,
                    &next_call,
                    "Not applied: the user cancelled the request.",
                )
                .await;
                return Err(cancelled());
            }
            req.patch = patch;
            let (applied, back) = apply_shaped(at.repo, req, at.shape.clone()).await?;
            req = back;
            call = next_call;
            match applied {
                Ok(outcome) => {
                    return Ok(Repaired {
                        outcome,
                        call,
                        answer: done.text(),
                    });
                }
                Err(e) => {
                    reasons.push(e.to_string());
                    if !repairable(&e) || attempt == self.repair_attempts {
                        answer_tool(at.conv, state, &call, &format!("Patch rejected: {e}")).await;
                        return Err(repair_failed(e.to_rpc(), &reasons));
                    }
                    error = e;
                }
            }
        }
        Err(repair_failed(error.to_rpc(), &reasons))
    }

    /// The numbered lines of the failed file closest to what the patch looked for, from the
    /// content the patch was matched against.
    async fn closest_lines(
        &self,
        repo: &RepoHandle,
        bases: &HashMap<String, Vec<u8>>,
        error: &edit::EditError,
    ) -> Option<String> {
        let edit::EditError::Match { path, source } = error else {
            return None;
        };
        let bytes = match bases.get(path) {
            Some(bytes) => bytes.clone(),
            None => {
                let abs = repo.workdir().join(path);
                tokio::fs::read(abs).await.ok()?
            }
        };
        let hint = edit::matcher::repair_hint(&bytes, source)?;
        Some(format!(
            "\nThe closest lines in {path} as it is now (line numbers on the left):\n{hint}"
        ))
    }

    /// The patch went stale: the user changed `path` in the same lines while the model wrote.
    /// The model is shown what they changed, as a diff against the content it saw (not the whole
    /// file again), and that content becomes what it saw and the base of its corrected patch, so
    /// the user's typing is kept.
    async fn users_changes(
        &self,
        repo: &RepoHandle,
        bases: &mut HashMap<String, Vec<u8>>,
        state: &mut ConvState,
        path: &str,
    ) -> Option<String> {
        let saw = bases.get(path)?;
        let now = tokio::fs::read(repo.workdir().join(path)).await.ok()?;
        let diff = context::diff(saw, &now);
        bases.insert(path.to_owned(), now.clone());
        state.seen.insert(path.to_owned(), now);
        Some(format!(
            "\nWhile you wrote it, the user changed {path} in the same lines. What they changed, \
             as a diff against the file you saw:\n{diff}\nKeep their changes."
        ))
    }
}

/// A follow-up turn (a repair, answered reads): [`stream_turn`] with `request` if any, the
/// history then trimmed to its limit.
async fn follow_up_turn<F, Fut>(
    at: &AskAt<'_>,
    state: &mut ConvState,
    request: Option<String>,
    emit: &F,
) -> Result<Streamed, RpcError>
where
    F: Fn(AskEvent) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let turn = stream_turn(at, state, request.map(InputItem::user_text), emit).await?;
    trim_history(state);
    Ok(turn)
}

/// The read-only tool calls of a response: (call id, name, arguments).
fn reads(output: &[OutputItem]) -> Vec<(String, String, String)> {
    output
        .iter()
        .filter_map(|item| match item {
            OutputItem::FunctionCall {
                call_id,
                name,
                arguments,
                ..
            } if Tool::is_read_only(name) => {
                Some((call_id.clone(), name.clone(), arguments.clone()))
            }
            _ => None,
        })
        .collect()
}

impl Asks {
    /// Answer the model's read-only tool calls from the repository (through the same guard as
    /// every byte that leaves; refusals are audited) and continue the turn, until it answers
    /// without reading, or the ask's budget of calls and bytes is spent: calls beyond it are
    /// answered with a refusal, and the model then answers with what it has.
    async fn answer_reads<F, Fut>(
        &self,
        at: &AskAt<'_>,
        state: &mut ConvState,
        mut turn: Streamed,
        emit: &F,
    ) -> Result<Streamed, RpcError>
    where
        F: Fn(AskEvent) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (mut calls_left, mut bytes_left) = (self.tool_calls, self.tool_bytes);
        // One round more than calls: the round that tells the model the budget is spent.
        for _ in 0..=self.tool_calls {
            let calls = reads(&turn.done.output);
            if calls.is_empty() || find_patch(&turn.done.output).is_some() {
                return Ok(turn);
            }
            for (call_id, name, arguments) in calls {
                let answer = if calls_left == 0 || bytes_left == 0 {
                    context::ReadAnswer {
                        output: format!(
                            "Refused: this request's budget of {} tool calls and {} bytes is \
                             spent. Answer with what you have.",
                            self.tool_calls, self.tool_bytes
                        ),
                        ..context::ReadAnswer::default()
                    }
                } else {
                    calls_left -= 1;
                    let watchers = self.watchers.clone();
                    let limit = bytes_left;
                    let (tool, args) = (name.clone(), arguments.clone());
                    at.repo
                        .run(move |ctx| context::answer_read(ctx, &watchers, &tool, &args, limit))
                        .await?
                };
                bytes_left = bytes_left.saturating_sub(answer.output.len());
                match &answer.refused {
                    Some((path, why)) => info!(
                        target: "audit",
                        repo = %at.repo.workdir().display(),
                        tool = %name,
                        path = %path,
                        reason = %why,
                        "tool read refused; nothing of it was sent"
                    ),
                    None => info!(
                        target: "audit",
                        repo = %at.repo.workdir().display(),
                        tool = %name,
                        files = ?answer.audit,
                        bytes = answer.output.len(),
                        "tool output sent to the provider"
                    ),
                }
                if let Some((path, bytes)) = answer.seen {
                    state.seen.insert(path, bytes);
                }
                answer_tool(at.conv, state, &Call::Function(call_id), &answer.output).await;
            }
            let deltas = turn.deltas;
            turn = follow_up_turn(at, state, None, emit).await?;
            turn.deltas += deltas;
        }
        Ok(turn)
    }
}

/// The request for a corrected patch: why the patch was refused is in the tool output before
/// it; this adds where the lines really are, and nothing the model has seen already.
fn repair_request(error: &edit::EditError, shown: Option<String>, reason_shown: bool) -> String {
    let mut text = if reason_shown {
        "Your patch was rejected (see the tool output); nothing was written.\n".to_owned()
    } else {
        format!("Your patch did not apply, and nothing was written: {error}\n")
    };
    if let Some(shown) = shown {
        text.push_str(&shown);
    }
    text.push_str(
        "\nSend one corrected patch with the apply_patch tool, against the file as it is now, \
         copying context lines exactly.",
    );
    text
}

/// Every round failed: the last error's code, kind, path and hint, with every reason.
fn repair_failed(mut last: RpcError, reasons: &[String]) -> RpcError {
    let mut message = String::from("the model's patch did not apply");
    for (n, reason) in reasons.iter().enumerate() {
        let lead = if n == 0 {
            ": "
        } else {
            "; its corrected patch did not apply either: "
        };
        message.push_str(lead);
        message.push_str(reason);
    }
    message.push_str("; nothing was written");
    last.message = message;
    last
}

/// Drop the oldest turns (each from a user message to the next) until the history fits. The
/// model then no longer holds those files when resent unchained, so what it "saw" is forgotten
/// too and the next ask shows focus files whole again.
fn trim_history(state: &mut ConvState) {
    let size = |h: &[InputItem]| {
        h.iter()
            .map(|i| serde_json::to_string(i).map(|s| s.len()).unwrap_or(0))
            .sum::<usize>()
    };
    if size(&state.history) <= MAX_HISTORY_BYTES {
        return;
    }
    let is_user = |i: &InputItem| {
        matches!(
            i,
            InputItem::Message {
                role: crate::provider::wire::Role::User,
                ..
            }
        )
    };
    // history[0] is the repository context; turns start at user messages after it.
    let mut dropped = false;
    while size(&state.history) > MAX_HISTORY_BYTES {
        let Some(next) = state
            .history
            .iter()
            .skip(2)
            .position(is_user)
            .map(|p| p + 2)
        else {
            break;
        };
        state.history.drain(1..next);
        dropped = true;
    }
    if dropped {
        state.seen.clear();
    }
}

/// The tool call a patch came in, to be answered on the next turn.
#[derive(Debug, Clone)]
enum Call {
    Custom(String),
    Function(String),
    /// The patch was in the message text: nothing to answer.
    None,
}

/// The patch of a response: the `apply_patch` custom tool call, its JSON function variant, or
/// a patch written in the message text.
fn find_patch(output: &[OutputItem]) -> Option<(Call, String)> {
    for item in output {
        match item {
            OutputItem::CustomToolCall {
                call_id,
                name,
                input,
                ..
            } if name == "apply_patch" => {
                return Some((Call::Custom(call_id.clone()), input.clone()));
            }
            OutputItem::FunctionCall {
                call_id,
                name,
                arguments,
                ..
            } if name == "apply_patch" => {
                return Some((Call::Function(call_id.clone()), patch_argument(arguments)));
            }
            _ => {}
        }
    }
    let text: String = output.iter().filter_map(OutputItem::text).collect();
    text.contains("*** Begin Patch")
        .then_some((Call::None, text))
}

/// Answer a tool call: the session sends the output at the head of the next turn, and the
/// history keeps it for any unchained resend of the conversation.
async fn answer_tool(conv: &Conversation, state: &mut ConvState, call: &Call, output: &str) {
    let (call_id, item) = match call {
        Call::Custom(id) => (
            id,
            InputItem::CustomToolCallOutput {
                call_id: id.clone(),
                output: output.to_owned(),
            },
        ),
        Call::Function(id) => (
            id,
            InputItem::FunctionCallOutput {
                call_id: id.clone(),
                output: output.to_owned(),
            },
        ),
        Call::None => return,
    };
    state.history.push(item);
    if let Err(e) = conv
        .session
        .set_pending_tool_output(call_id.as_str(), output)
        .await
    {
        tracing::warn!(error = %e, "cannot record the tool output for the next turn");
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn internal(what: &str) -> RpcError {
    RpcError::new(ErrorCode::Internal, what.to_owned())
}

fn cancelled() -> RpcError {
    RpcError::new(
        ErrorCode::Cancelled,
        "the request was cancelled; nothing was applied",
    )
    .with_kind("cancelled")
}

fn turn_failure(f: TurnFailure) -> RpcError {
    match f {
        TurnFailure::Cancelled => cancelled(),
        TurnFailure::Provider { code, message } => {
            let mut e = RpcError::new(
                ErrorCode::Provider,
                format!("the provider refused the request: {message}; nothing was applied"),
            );
            if let Some(c) = code {
                e = e.with_kind(c);
            }
            e
        }
        TurnFailure::Transport(m) => RpcError::new(
            ErrorCode::Provider,
            format!("cannot reach the provider: {m}; nothing was applied"),
        )
        .with_kind("transport")
        .with_hint("check SPARK_PROVIDER_URL and the network; `sparkctl status` shows the session"),
        TurnFailure::Shutdown => RpcError::new(ErrorCode::ShuttingDown, "sparkd is shutting down"),
    }
}

fn session_error(e: crate::provider::SessionError) -> RpcError {
    match e {
        crate::provider::SessionError::Failed(f) => turn_failure(f),
        other => RpcError::new(ErrorCode::Provider, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(i: &InputItem) -> String {
        serde_json::to_string(i).expect("json")
    }

    #[test]
    fn trimming_drops_whole_old_turns_and_keeps_the_context_and_the_last_turn() {
        let mut state = ConvState::default();
        state.history.push(InputItem::developer_text("context"));
        for n in 0..6 {
            state.history.push(InputItem::user_text(format!(
                "turn {n} {}",
                "x".repeat(20_000)
            )));
            state.history.push(InputItem::CustomToolCall {
                call_id: format!("c{n}"),
                name: "apply_patch".into(),
                input: "p".into(),
            });
            state.history.push(InputItem::CustomToolCallOutput {
                call_id: format!("c{n}"),
                output: "ok".into(),
            });
        }
        state.seen.insert("a.rs".into(), b"x".to_vec());
        trim_history(&mut state);
        let all: Vec<String> = state.history.iter().map(text).collect();
        assert!(all[0].contains("context"));
        assert!(all.iter().map(String::len).sum::<usize>() <= MAX_HISTORY_BYTES);
        assert!(
            all.last().is_some_and(|l| l.contains("c5")),
            "the last turn stays"
        );
        assert!(
            !all.iter().any(|l| l.contains("turn 0 ")),
            "the oldest turn went"
        );
        // Calls and their outputs stay paired.
        for n in 0..6 {
            let call = all.iter().any(|l| {
                l.contains(&format!("\"call_id\":\"c{n}\"")) && l.contains("custom_tool_call\"")
            });
            let out = all.iter().any(|l| {
                l.contains(&format!("\"call_id\":\"c{n}\""))
                    && l.contains("custom_tool_call_output")
            });
            assert_eq!(
                call, out,
                "call {n} and its output are kept or dropped together"
            );
        }
        assert!(
            state.seen.is_empty(),
            "forgotten files are shown whole next time"
        );
    }

    fn choice(url: &str) -> ProviderChoice {
        ProviderChoice {
            url: url.to_owned(),
            model: "m".to_owned(),
            api_key: Some(Arc::from("k")),
        }
    }

    #[tokio::test]
    async fn idle_sessions_for_other_settings_close_and_the_daemon_s_own_and_busy_ones_stay() {
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let conv = |url: &str| {
            let session = crate::provider::spawn(
                SessionConfig::new(url, None, "m"),
                &tracker,
                shutdown.clone(),
            )
            .expect("session");
            Arc::new(Conversation {
                session,
                state: tokio::sync::Mutex::new(ConvState::default()),
                current: Mutex::new(None),
                created: Instant::now(),
                last_used: Mutex::new(Instant::now()),
            })
        };
        let own = choice("ws://127.0.0.1:1/v1/responses");
        let (idle, busy, fresh) = (
            choice("ws://127.0.0.1:2/v1/responses"),
            choice("ws://127.0.0.1:3/v1/responses"),
            choice("ws://127.0.0.1:4/v1/responses"),
        );
        let mut convs = HashMap::new();
        for c in [&own, &idle, &busy, &fresh] {
            convs.insert((PathBuf::from("/r"), c.clone()), conv(&c.url));
        }
        let later = Instant::now() + OTHER_SETTINGS_IDLE;
        *convs[&(PathBuf::from("/r"), fresh.clone())]
            .last_used
            .lock()
            .expect("lock") = later;
        *convs[&(PathBuf::from("/r"), busy.clone())]
            .current
            .lock()
            .expect("lock") = Some((1, CancellationToken::new()));
        let session_of_idle = convs[&(PathBuf::from("/r"), idle.clone())].session.clone();

        close_idle(&mut convs, &own, later);
        let mut left: Vec<&str> = convs.keys().map(|(_, p)| p.url.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [&own.url, &busy.url, &fresh.url].map(String::as_str),
            "only the idle session for other settings went"
        );
        // Once its last handle is gone the session stops, and with it its connection.
        drop(convs);
        shutdown.cancel();
        drop(session_of_idle);
        tracker.close();
        tracker.wait().await;
    }

    #[test]
    fn provider_choices_never_print_their_key() {
        let c = ProviderChoice {
            api_key: Some(Arc::from("sk-never-shown")),
            ..choice("ws://127.0.0.1:1/v1/responses")
        };
        assert!(!format!("{c:?}").contains("sk-never-shown"));
    }
}
